//! Random SPD models of any shape, built in memory: for property tests (fast vs reference engine on
//! many shapes) and benchmarks (a model shaped like the real SimpleStories decomposition).

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};

use super::checkpoint::TensorFile;
use super::ci::CiFn;
use super::components::Components;
use super::config::{CiFnType, Gpt2Config, Sampling, SigmoidType, SpdConfig, TaskConfig};
use super::gpt2_simple::{Gpt2Simple, ModuleKind};
use super::spd::{DecomposedModule, SpdModel};

/// The shape of a synthetic model.
#[derive(Debug, Clone)]
pub struct SyntheticSpec {
    pub n_layer: usize,
    pub n_head: usize,
    pub n_embd: usize,
    pub vocab_size: usize,
    pub block_size: usize,
    pub c: usize,
    pub ci_fn_type: CiFnType,
    pub ci_hidden: Vec<usize>,
    /// Target fraction of CI values > 0 (the CI networks' final bias is shifted to reach it).
    pub ci_active_frac: f64,
    pub seed: u64,
}

impl SyntheticSpec {
    /// The shape of the 1.25M-parameter SimpleStories decomposition the original tool is used on.
    pub fn simple_stories_1m() -> Self {
        Self {
            n_layer: 4,
            n_head: 4,
            n_embd: 128,
            vocab_size: 4019,
            block_size: 512,
            c: 1200,
            ci_fn_type: CiFnType::SharedMlp,
            ci_hidden: vec![1000],
            ci_active_frac: 0.02,
            seed: 0,
        }
    }
}

/// SplitMix64 with Box–Muller normals: deterministic across platforms, no dependency.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed ^ 0x9E37_79B9_7F4A_7C15)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(1e-300);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.uniform() * n as f64) as usize % n.max(1)
    }
}

fn randn(rng: &mut Rng, shape: &[usize], std: f64) -> Tensor {
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n).map(|_| (rng.normal() * std) as f32).collect();
    Tensor::from_vec(data, shape, &Device::Cpu).expect("shape matches data")
}

/// Builds a random model of `spec` with every projection decomposed.
pub fn synthetic_model(spec: &SyntheticSpec) -> candle_core::Result<SpdModel> {
    let mut rng = Rng::new(spec.seed);
    let (d, v, c) = (spec.n_embd, spec.vocab_size, spec.c);
    let mut t: HashMap<String, Tensor> = HashMap::new();
    t.insert("wte.weight".into(), randn(&mut rng, &[v, d], 0.5));
    t.insert(
        "wpe.weight".into(),
        randn(&mut rng, &[spec.block_size, d], 0.1),
    );
    let ln = |t: &mut HashMap<String, Tensor>, rng: &mut Rng, name: &str| {
        let w: Vec<f32> = (0..d).map(|_| (1.0 + 0.2 * rng.normal()) as f32).collect();
        t.insert(
            format!("{name}.weight"),
            Tensor::new(w, &Device::Cpu).expect("vec"),
        );
        t.insert(format!("{name}.bias"), randn(rng, &[d], 0.1));
    };
    for i in 0..spec.n_layer {
        ln(&mut t, &mut rng, &format!("h.{i}.ln_1"));
        ln(&mut t, &mut rng, &format!("h.{i}.ln_2"));
        for kind in ModuleKind::ALL {
            let (d_in, d_out) = match kind {
                ModuleKind::CFc => (d, 4 * d),
                ModuleKind::Down => (4 * d, d),
                _ => (d, d),
            };
            let p = format!("h.{i}.{}", kind.suffix());
            t.insert(
                format!("{p}.weight"),
                randn(&mut rng, &[d_out, d_in], 1.0 / (d_in as f64).sqrt()),
            );
            t.insert(format!("{p}.bias"), randn(&mut rng, &[d_out], 0.05));
        }
    }
    ln(&mut t, &mut rng, "ln_f");
    let cfg = Gpt2Config {
        block_size: spec.block_size,
        vocab_size: v,
        n_layer: spec.n_layer,
        n_head: spec.n_head,
        n_embd: d,
    };
    let target = Gpt2Simple::new(cfg, &TensorFile::from_map(PathBuf::from("<synthetic>"), t))
        .map_err(candle_core::Error::wrap)?;

    let mut spd: HashMap<String, Tensor> = HashMap::new();
    let mut modules = Vec::new();
    for id in target.module_ids() {
        let name = id.name();
        let dash = name.replace('.', "-");
        let lin = target.linear(id);
        let (d_in, d_out) = (lin.d_in(), lin.d_out());
        spd.insert(
            format!("_components.{dash}.V"),
            randn(&mut rng, &[d_in, c], 1.0 / (d_in as f64).sqrt()),
        );
        spd.insert(
            format!("_components.{dash}.U"),
            randn(&mut rng, &[c, d_out], 1.0 / (c as f64).sqrt()),
        );
        let (first, last) = match spec.ci_fn_type {
            CiFnType::SharedMlp => (d_in, c),
            CiFnType::VectorMlp => (d_in, 1),
            CiFnType::Mlp => (1, 1),
        };
        let mut dims = vec![first];
        dims.extend(&spec.ci_hidden);
        dims.push(last);
        for (l, w) in dims.windows(2).enumerate() {
            let std = 1.0 / (w[0] as f64).sqrt();
            let (wk, bk) = (
                format!("_ci_fns.{dash}.layers.{}.W", 2 * l),
                format!("_ci_fns.{dash}.layers.{}.b", 2 * l),
            );
            match spec.ci_fn_type {
                CiFnType::SharedMlp => {
                    spd.insert(wk, randn(&mut rng, &[w[0], w[1]], std));
                    spd.insert(bk, randn(&mut rng, &[w[1]], 0.1));
                }
                _ => {
                    spd.insert(wk, randn(&mut rng, &[c, w[0], w[1]], std));
                    spd.insert(bk, randn(&mut rng, &[c, w[1]], 0.1));
                }
            }
        }
        let f = TensorFile::from_map(PathBuf::from("<synthetic>"), spd.clone());
        let components = Components::new(&f, &name, d_in, d_out, c, lin.bias.as_ref())
            .map_err(candle_core::Error::wrap)?;
        let ci_fn = CiFn::new(&f, &name, spec.ci_fn_type, &spec.ci_hidden, d_in, c)
            .map_err(candle_core::Error::wrap)?;
        modules.push(DecomposedModule {
            id,
            name,
            components,
            ci_fn,
        });
    }
    let mut model = SpdModel {
        config: SpdConfig {
            c,
            ci_fn_type: spec.ci_fn_type,
            ci_fn_hidden_dims: spec.ci_hidden.clone(),
            sigmoid_type: SigmoidType::LeakyHard,
            sampling: Sampling::Continuous,
            target_module_patterns: vec!["h.*".into()],
            pretrained_model_class: "GPT2Simple".into(),
            pretrained_model_name: None,
            pretrained_model_path: None,
            tokenizer_name: None,
            task_config: TaskConfig::default(),
        },
        target,
        modules,
        checkpoint: PathBuf::from("<synthetic>"),
    };
    calibrate_ci_bias(&mut model, spec.ci_active_frac, &mut rng)?;
    Ok(model)
}

/// Shifts each CI network's final bias so that about `frac` of its outputs on random prompts are > 0.
fn calibrate_ci_bias(model: &mut SpdModel, frac: f64, rng: &mut Rng) -> candle_core::Result<()> {
    let t = model.block_size().min(32);
    let tokens: Vec<u32> = (0..4 * t)
        .map(|_| rng.below(model.vocab_size()) as u32)
        .collect();
    let batch = Tensor::from_slice(&tokens, (4, t), &Device::Cpu)?;
    let out = model.ci(&batch)?;
    for (m, z) in model.modules.iter_mut().zip(out.pre_sigmoid) {
        let mut zs: Vec<f32> = z.flatten_all()?.to_vec1()?;
        zs.sort_by(f32::total_cmp);
        let q = zs[((1.0 - frac) * (zs.len() - 1) as f64) as usize];
        let (_, b) = m.ci_fn.layers.last_mut().expect("at least one layer");
        *b = (b.clone() - q as f64)?;
    }
    Ok(())
}
