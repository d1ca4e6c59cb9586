//! The numpy operations diffusers' `set_timesteps` is written in, reproduced to the bit (float64
//! arithmetic in numpy's order), and the float32 scalar functions its 0-d tensor math uses.

use tch::Tensor;

/// `np.linspace(start, stop, num)`: `start + i * step`, the last value exactly `stop`.
pub fn linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 1 {
        return vec![start];
    }
    let step = (stop - start) / (num - 1) as f64;
    (0..num)
        .map(|i| {
            if i == num - 1 {
                stop
            } else {
                i as f64 * step + start
            }
        })
        .collect()
}

/// `np.arange(start, stop, step)` for a float `step`: `ceil((stop - start) / step)` values; the
/// second is `start + step`, the others `start + i * delta` with `delta` the difference of the
/// first two. (The length can come out one more than the exact quotient suggests, e.g. for
/// `np.arange(1000, 0, -1000 / 61)`; diffusers then has an extra timestep, and so do we.)
pub fn arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil();
    if len.is_nan() || len <= 0.0 {
        return Vec::new();
    }
    let len = len as usize;
    let second = start + step;
    let delta = second - start;
    (0..len)
        .map(|i| match i {
            0 => start,
            1 => second,
            _ => start + i as f64 * delta,
        })
        .collect()
}

/// `np.round`: to the nearest integer, halves to even.
pub fn round(x: f64) -> f64 {
    x.round_ties_even()
}

/// `np.interp(x, np.arange(len(fp)), fp)`: piecewise-linear interpolation of `fp` (given at
/// the integers), clamped to the end values outside.
pub fn interp(x: f64, fp: &[f32]) -> f64 {
    let last = fp.len() - 1;
    if x.is_nan() {
        return x;
    }
    if x <= 0.0 {
        return fp[0].into();
    }
    if x >= last as f64 {
        return fp[last].into();
    }
    let j = x.floor() as usize;
    let (left, right) = (f64::from(fp[j]), f64::from(fp[j + 1]));
    if x == j as f64 {
        return left;
    }
    let slope = right - left; // over a unit interval
    slope * (x - j as f64) + left
}

/// A libtorch float32 CPU kernel applied to one value, as diffusers' 0-d tensor math does.
///
/// libtorch's `sqrt`, `log` and `exp` come from MKL or Sleef and are not always correctly
/// rounded, so Rust's `f32` functions would differ from diffusers in the last bit now and
/// then (the basic arithmetic operations are exact in both and need no detour).
fn torch_f32(x: f32, op: impl FnOnce(&Tensor) -> Tensor) -> f32 {
    op(&Tensor::from(x)).double_value(&[]) as f32
}

/// `torch.sqrt` (and `** 0.5`) of a float32 0-d tensor.
pub fn torch_sqrt(x: f32) -> f32 {
    torch_f32(x, Tensor::sqrt)
}

/// `torch.log` of a float32 0-d tensor.
pub fn torch_ln(x: f32) -> f32 {
    torch_f32(x, Tensor::log)
}

/// `torch.exp` of a float32 0-d tensor.
pub fn torch_exp(x: f32) -> f32 {
    torch_f32(x, Tensor::exp)
}

/// `torch.sqrt` of a float32 vector (elementwise the same as [`torch_sqrt`]).
pub fn torch_sqrt_all(values: &[f32]) -> Vec<f32> {
    Vec::<f32>::try_from(Tensor::from_slice(values).sqrt()).expect("a float32 vector")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linspace_matches_numpy() {
        assert_eq!(linspace(0.0, 999.0, 4), vec![0.0, 333.0, 666.0, 999.0]);
        assert_eq!(linspace(0.0, 1.0, 1), vec![0.0]);
    }

    #[test]
    fn arange_can_overshoot_like_numpy() {
        assert_eq!(
            arange(1000.0, 0.0, -250.0),
            vec![1000.0, 750.0, 500.0, 250.0]
        );
        // 1000 / (1000 / 61) rounds to a hair above 61.
        assert_eq!(arange(1000.0, 0.0, -1000.0 / 61.0).len(), 62);
    }

    #[test]
    fn round_is_half_to_even() {
        assert_eq!(round(937.5), 938.0);
        assert_eq!(round(812.5), 812.0);
    }

    #[test]
    fn interp_clamps_and_interpolates() {
        let fp = [1.0f32, 3.0, 7.0];
        assert_eq!(interp(-1.0, &fp), 1.0);
        assert_eq!(interp(0.5, &fp), 2.0);
        assert_eq!(interp(1.0, &fp), 3.0);
        assert_eq!(interp(1.25, &fp), 4.0);
        assert_eq!(interp(5.0, &fp), 7.0);
    }
}
