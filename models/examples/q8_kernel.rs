//! Times attune's Q8_0 kernel against candle's quantized matmul on the default
//! model's layer shapes: `cargo run --release -p attune-models --example q8_kernel`.

use std::time::Instant;

use attune_models::kernels::q8_0::Q8Matrix;
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};

fn main() -> candle_core::Result<()> {
    for (n, k) in [(960, 576), (3072, 576), (576, 1536), (49152, 576)] {
        for m in [1usize, 8] {
            let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu)?;
            let q = QTensor::quantize(&w, GgmlDType::Q8_0)?;
            let ours =
                Q8Matrix::from_gguf_bytes(&q.data()?, n, k).map_err(candle_core::Error::msg)?;
            let theirs = QMatMul::from_qtensor(q)?;
            let x = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu)?;
            let xv = x.flatten_all()?.to_vec1::<f32>()?;
            let mut out = vec![0f32; m * n];
            let reps = (200_000_000 / (n * k)).max(3);
            let t = Instant::now();
            for _ in 0..reps {
                ours.matmul(&xv, m, &mut out);
            }
            let a = t.elapsed().as_secs_f64() / reps as f64;
            let t = Instant::now();
            for _ in 0..reps {
                theirs.forward(&x)?;
            }
            let b = t.elapsed().as_secs_f64() / reps as f64;
            let gb = (n * k) as f64 * 34.0 / 32.0 / 1e9;
            println!(
                "n={n:>6} k={k:>5} m={m}: attune {:>8.1} µs ({:>5.1} GB/s)  candle {:>8.1} µs ({:>5.1} GB/s)  ratio {:.2}",
                a * 1e6, gb / a, b * 1e6, gb / b, b / a
            );
        }
    }
    Ok(())
}
