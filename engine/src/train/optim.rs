//! AdamW as torch.optim.AdamW computes it (decoupled weight decay, bias-corrected moments),
//! gradient-norm clipping over all parameters, and diffusers' constant learning rate with
//! linear warmup. Written out rather than taken from libtorch's C++ optimizer so that the
//! moments can be checkpointed and restored exactly.

use tch::{Kind, Tensor};

#[derive(Debug, Clone, Copy)]
pub struct AdamWConfig {
    pub lr: f64,
    pub betas: (f64, f64),
    pub eps: f64,
    pub weight_decay: f64,
}

/// The optimizer's state for a fixed list of parameters.
pub struct AdamW {
    pub config: AdamWConfig,
    /// Optimizer steps taken (torch's per-parameter `step`, the same for all here).
    pub step: u64,
    /// First and second moments, one pair per parameter, float32.
    pub exp_avg: Vec<Tensor>,
    pub exp_avg_sq: Vec<Tensor>,
}

impl AdamW {
    pub fn new(config: AdamWConfig, params: &[Tensor]) -> Self {
        AdamW {
            config,
            step: 0,
            exp_avg: params.iter().map(Tensor::zeros_like).collect(),
            exp_avg_sq: params.iter().map(Tensor::zeros_like).collect(),
        }
    }

    /// One update of `params` from their gradients at learning rate `lr`: torch's
    /// single-tensor AdamW (`amsgrad=False, maximize=False`).
    pub fn step(&mut self, params: &[Tensor], lr: f64) {
        let AdamWConfig {
            betas: (beta1, beta2),
            eps,
            weight_decay,
            ..
        } = self.config;
        self.step += 1;
        let bias_correction1 = 1.0 - beta1.powi(self.step as i32);
        let bias_correction2 = 1.0 - beta2.powi(self.step as i32);
        tch::no_grad(|| {
            for ((param, m), v) in params
                .iter()
                .zip(&mut self.exp_avg)
                .zip(&mut self.exp_avg_sq)
            {
                let grad = param.grad();
                if !grad.defined() {
                    continue;
                }
                let mut param = param.shallow_clone();
                let _ = param.g_mul_scalar_(1.0 - lr * weight_decay);
                let _ = m.lerp_(&grad, 1.0 - beta1);
                let _ = v.g_mul_scalar_(beta2);
                let _ = v.addcmul_(&grad, &(&grad * (1.0 - beta2)));
                let denom = v.sqrt() / bias_correction2.sqrt() + eps;
                let update = &*m / denom * (lr / bias_correction1);
                let _ = param.g_sub_(&update);
            }
        });
    }
}

/// Zeroes (drops) the gradients of `params`.
pub fn zero_grad(params: &[Tensor]) {
    for p in params {
        let mut grad = p.grad();
        if grad.defined() {
            let _ = grad.detach_().zero_();
        }
    }
}

/// The total L2 norm of the gradients of `params` (torch's `clip_grad_norm_` norm).
pub fn grad_norm(params: &[Tensor]) -> f64 {
    tch::no_grad(|| {
        let norms: Vec<Tensor> = params
            .iter()
            .map(Tensor::grad)
            .filter(Tensor::defined)
            .map(|g| g.to_kind(Kind::Float).norm())
            .collect();
        if norms.is_empty() {
            return 0.0;
        }
        Tensor::stack(&norms, 0).norm().double_value(&[])
    })
}

/// Scales the gradients so that their total norm is at most `max_norm` (torch's
/// `clip_grad_norm_`: coefficient `max_norm / (norm + 1e-6)`, applied when below 1).
/// Returns the norm before clipping.
pub fn clip_grad_norm(params: &[Tensor], max_norm: f64) -> f64 {
    let norm = grad_norm(params);
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        scale_grads(params, coef);
    }
    norm
}

/// Multiplies every gradient by `factor`.
pub fn scale_grads(params: &[Tensor], factor: f64) {
    tch::no_grad(|| {
        for p in params {
            let mut grad = p.grad();
            if grad.defined() {
                let _ = grad.g_mul_scalar_(factor);
            }
        }
    });
}

/// Whether every gradient is finite. The per-gradient checks are combined on the device
/// and read back once, so a float16 step waits for the GPU once rather than per parameter.
pub fn grads_finite(params: &[Tensor]) -> bool {
    tch::no_grad(|| {
        let per_grad: Vec<Tensor> = params
            .iter()
            .map(Tensor::grad)
            .filter(Tensor::defined)
            .map(|g| g.isfinite().all())
            .collect();
        per_grad.is_empty() || Tensor::stack(&per_grad, 0).all().int64_value(&[]) != 0
    })
}

/// diffusers' `constant_with_warmup` at optimizer step `step` (0-based, the step about to
/// be taken): `lr × step / warmup` during warmup, `lr` after.
pub fn warmup_lr(lr: f64, warmup_steps: u32, step: u32) -> f64 {
    if step < warmup_steps {
        lr * f64::from(step) / f64::from(warmup_steps.max(1))
    } else {
        lr
    }
}

/// Dynamic loss scaling for float16 training (torch.cuda.amp.GradScaler's defaults): the
/// loss is multiplied by `scale` before backward; a step whose gradients overflow is
/// skipped and halves the scale, 2000 good steps in a row double it.
#[derive(Debug, Clone)]
pub struct LossScaler {
    pub scale: f64,
    good_steps: u32,
}

impl Default for LossScaler {
    fn default() -> Self {
        LossScaler {
            scale: 65536.0,
            good_steps: 0,
        }
    }
}

impl LossScaler {
    /// After backward on the scaled loss: unscales the gradients and says whether to step.
    pub fn unscale(&mut self, params: &[Tensor]) -> bool {
        if !grads_finite(params) {
            self.scale /= 2.0;
            self.good_steps = 0;
            return false;
        }
        scale_grads(params, 1.0 / self.scale);
        self.good_steps += 1;
        if self.good_steps >= 2000 {
            self.scale *= 2.0;
            self.good_steps = 0;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_is_linear_then_constant() {
        assert_eq!(warmup_lr(1e-3, 4, 0), 0.0);
        assert!((warmup_lr(1e-3, 4, 2) - 5e-4).abs() < 1e-12);
        assert_eq!(warmup_lr(1e-3, 4, 4), 1e-3);
        assert_eq!(warmup_lr(1e-3, 0, 0), 1e-3);
    }

    #[test]
    fn adamw_matches_torch_on_one_parameter() {
        // torch.optim.AdamW([p], lr=0.1, weight_decay=0.01) on p = [1, -2] with
        // grad = [0.5, 0.25], two steps; by hand: the first step moves each value by
        // lr × sign(grad) after decay, as m̂ / sqrt(v̂) = ±1.
        let p = Tensor::from_slice(&[1.0f32, -2.0]).set_requires_grad(true);
        let config = AdamWConfig {
            lr: 0.1,
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.01,
        };
        let mut opt = AdamW::new(config, std::slice::from_ref(&p));
        let loss = (&p * Tensor::from_slice(&[0.5f32, 0.25])).sum(Kind::Float);
        loss.backward();
        opt.step(std::slice::from_ref(&p), 0.1);
        let got: Vec<f32> = Vec::try_from(p.detach()).unwrap();
        let want = [1.0 * (1.0 - 0.001) - 0.1, -2.0 * (1.0 - 0.001) - 0.1];
        for (g, w) in got.iter().zip(want) {
            assert!((f64::from(*g) - w).abs() < 1e-6, "{got:?} vs {want:?}");
        }
    }

    #[test]
    fn clipping_bounds_the_total_norm() {
        let p = Tensor::from_slice(&[0.0f32, 0.0]).set_requires_grad(true);
        let loss = (&p * Tensor::from_slice(&[3.0f32, 4.0])).sum(Kind::Float);
        loss.backward();
        let before = clip_grad_norm(std::slice::from_ref(&p), 1.0);
        assert!((before - 5.0).abs() < 1e-5);
        assert!((grad_norm(std::slice::from_ref(&p)) - 1.0).abs() < 1e-5);
    }

    #[test]
    fn one_non_finite_gradient_makes_the_step_non_finite() {
        let grads_of = |values: [f32; 2]| {
            let p = Tensor::from_slice(&[1.0f32, 1.0]).set_requires_grad(true);
            let q = Tensor::from_slice(&[1.0f32]).set_requires_grad(true);
            let loss = (&p * Tensor::from_slice(&values)).sum(Kind::Float) + q.sum(Kind::Float);
            loss.backward();
            [p, q]
        };
        assert!(grads_finite(&grads_of([0.5, 2.0])));
        assert!(!grads_finite(&grads_of([0.5, f32::INFINITY])));
        assert!(!grads_finite(&grads_of([f32::NAN, 2.0])));
        let no_grad = Tensor::from_slice(&[1.0f32]);
        assert!(grads_finite(&[no_grad]));
    }
}
