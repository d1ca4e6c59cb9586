//! kohya's SDXL LoRAs name UNet modules after Stability's original ("SGM") UNet, flattened
//! with `_`: `input_blocks_4_1_transformer_blocks_0_attn1_to_q`. This maps such a name to
//! diffusers' flattened module path (`down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q`)
//! as diffusers' `_maybe_map_sgm_blocks_to_diffusers` and `_convert_unet_lora_key` do.

/// diffusers' flattened module path for the SGM name `flat`, given the UNet's
/// `layers_per_block`; `None` when `flat` is not an SGM UNet name.
pub(crate) fn sgm_to_diffusers(flat: &str, layers_per_block: usize) -> Option<String> {
    let parts: Vec<&str> = flat.split('_').collect();
    let per_block = layers_per_block + 1;
    let index = |s: &str| s.parse::<usize>().ok();
    let (head, rest): (String, &[&str]) = match parts.as_slice() {
        ["input", "blocks", "0", "0", rest @ ..] => ("conv_in".into(), rest),
        ["input", "blocks", i, inner, rest @ ..] => {
            let i = index(i)?.checked_sub(1)?;
            let (block, layer) = (i / per_block, i % per_block);
            match (*inner, rest) {
                (_, ["op", rest @ ..]) => {
                    (format!("down_blocks_{block}_downsamplers_0_conv"), rest)
                }
                ("0", rest) => (format!("down_blocks_{block}_resnets_{layer}"), rest),
                ("1", rest) => (format!("down_blocks_{block}_attentions_{layer}"), rest),
                _ => return None,
            }
        }
        ["middle", "block", i, rest @ ..] => {
            let part = match *i {
                "0" => "resnets_0",
                "1" => "attentions_0",
                "2" => "resnets_1",
                _ => return None,
            };
            (format!("mid_block_{part}"), rest)
        }
        ["output", "blocks", i, inner, rest @ ..] => {
            let i = index(i)?;
            let (block, layer) = (i / per_block, i % per_block);
            let part = match *inner {
                "0" => format!("resnets_{layer}"),
                "1" => format!("attentions_{layer}"),
                "2" => "upsamplers_0".to_string(),
                _ => return None,
            };
            (format!("up_blocks_{block}_{part}"), rest)
        }
        ["time", "embed", n] => {
            let linear = match *n {
                "0" => "linear_1",
                "2" => "linear_2",
                _ => return None,
            };
            return Some(format!("time_embedding_{linear}"));
        }
        ["label", "emb", "0", n] => {
            let linear = match *n {
                "0" => "linear_1",
                "2" => "linear_2",
                _ => return None,
            };
            return Some(format!("add_embedding_{linear}"));
        }
        ["out", "2"] => return Some("conv_out".into()),
        _ => return None,
    };
    let rest = rest.join("_");
    // A resnet's parts, in SGM's names.
    let rest = match rest.as_str() {
        "in_layers_2" => "conv1".to_string(),
        "out_layers_3" => "conv2".to_string(),
        "emb_layers_1" => "time_emb_proj".to_string(),
        "skip_connection" => "conv_shortcut".to_string(),
        _ => rest,
    };
    Some(if rest.is_empty() {
        head
    } else {
        format!("{head}_{rest}")
    })
}

#[cfg(test)]
mod tests {
    use super::sgm_to_diffusers;

    /// SDXL base: layers_per_block 2; names as kohya's SDXL LoRAs spell them.
    #[test]
    fn sdxl_block_names_map_as_diffusers_maps_them() {
        let map = |flat| sgm_to_diffusers(flat, 2);
        for (sgm, diffusers) in [
            (
                "input_blocks_4_1_transformer_blocks_0_attn1_to_q",
                "down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q",
            ),
            (
                "input_blocks_8_1_proj_in",
                "down_blocks_2_attentions_1_proj_in",
            ),
            (
                "input_blocks_1_0_in_layers_2",
                "down_blocks_0_resnets_0_conv1",
            ),
            ("input_blocks_3_0_op", "down_blocks_0_downsamplers_0_conv"),
            ("input_blocks_0_0", "conv_in"),
            (
                "middle_block_1_transformer_blocks_9_ff_net_2",
                "mid_block_attentions_0_transformer_blocks_9_ff_net_2",
            ),
            (
                "middle_block_2_emb_layers_1",
                "mid_block_resnets_1_time_emb_proj",
            ),
            (
                "output_blocks_5_1_transformer_blocks_1_attn2_to_out_0",
                "up_blocks_1_attentions_2_transformer_blocks_1_attn2_to_out_0",
            ),
            ("output_blocks_2_2_conv", "up_blocks_0_upsamplers_0_conv"),
            (
                "output_blocks_0_0_skip_connection",
                "up_blocks_0_resnets_0_conv_shortcut",
            ),
            ("time_embed_2", "time_embedding_linear_2"),
            ("label_emb_0_0", "add_embedding_linear_1"),
            ("out_2", "conv_out"),
        ] {
            assert_eq!(map(sgm).as_deref(), Some(diffusers), "{sgm}");
        }
        assert_eq!(map("down_blocks_0_attentions_0_proj_in"), None);
        assert_eq!(map("middle_block_7_proj_in"), None);
    }
}
