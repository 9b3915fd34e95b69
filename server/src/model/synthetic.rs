//! Random SPD models of any shape, built in memory: for property tests (fast vs reference engine on
//! many shapes) and benchmarks (a model shaped like the real SimpleStories decomposition).

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};

use super::checkpoint::TensorFile;
use super::config::{
    CiConfig, CiFnType, GlobalCiConfig, GlobalCiFnType, ModuleInfo, Sampling, SigmoidType,
    SpdConfig, TaskConfig, glob_match,
};
use super::spd::SpdModel;
use super::transformer::{Family, Gpt2Config, LlamaConfig, NormKind, TargetConfig, Transformer};

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
    pub family: Family,
    /// K/V heads of a Llama family (`None`: as many as query heads).
    pub n_kv_head: Option<usize>,
    /// C per module in model order (`None`: `c` everywhere).
    pub module_c: Option<Vec<usize>>,
    /// A global CI network instead of the layerwise `ci_fn_type` (shared MLP or transformer).
    pub global_ci: Option<GlobalCiConfig>,
    /// Biases on the projections (GPT2Simple always has them).
    pub biases: bool,
    pub use_delta_component: bool,
    /// Projections (fnmatch patterns) that get a decomposed identity inserted in front of them,
    /// with `c` components each.
    pub identities: Vec<String>,
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
            family: Family::Gpt2Simple,
            n_kv_head: None,
            module_c: None,
            global_ci: None,
            biases: true,
            use_delta_component: true,
            identities: vec![],
        }
    }

    /// The shape of spd's `pile_llama_simple_mlp-4L` decomposition (SPEC §8): LlamaSimpleMLP, 4
    /// blocks, d 768, 6 heads, vocab 50,277, 512-token context, no biases, C from 128 to 2,560 per
    /// module. With a layerwise `shared_mlp` CI (hidden [512]) so that it runs on a CPU; see
    /// [`Self::pile_transformer_ci`] for the global CI network the real run has.
    pub fn pile_llama_mlp_4l() -> Self {
        // Per block: q, k, v, o, c_fc, down_proj (model order).
        let c = [
            [256, 256, 512, 512, 1536, 1536],
            [128, 128, 256, 256, 512, 512],
            [128, 256, 640, 640, 512, 512],
            [128, 128, 512, 512, 1536, 2560],
        ];
        Self {
            n_layer: 4,
            n_head: 6,
            n_embd: 768,
            vocab_size: 50_277,
            block_size: 512,
            c: 512,
            ci_fn_type: CiFnType::SharedMlp,
            ci_hidden: vec![512],
            ci_active_frac: 0.02,
            seed: 4,
            family: Family::LlamaSimpleMlp,
            n_kv_head: Some(6),
            module_c: Some(c.iter().flatten().copied().collect()),
            global_ci: None,
            biases: false,
            use_delta_component: true,
            identities: vec![],
        }
    }

    /// [`Self::pile_llama_mlp_4l`] with the real run's CI network: a global shared transformer,
    /// d_model 2,048, 8 blocks, 16 heads, MLP [8,192].
    pub fn pile_transformer_ci() -> Self {
        use super::config::{AttnConfig, TransformerCiConfig};
        Self {
            global_ci: Some(GlobalCiConfig {
                fn_type: GlobalCiFnType::SharedTransformer,
                hidden_dims: vec![],
                transformer: Some(TransformerCiConfig {
                    d_model: 2048,
                    n_blocks: 8,
                    mlp_hidden_dim: vec![8192],
                    attn_config: AttnConfig {
                        n_heads: 16,
                        max_len: 512,
                        rope_base: 10000.0,
                    },
                }),
                reader_hidden_dims: vec![],
                d_resid: None,
                block_groups: vec![],
                transition_attn: None,
                transition_hidden_dim: None,
            }),
            ..Self::pile_llama_mlp_4l()
        }
    }

    /// The target's description.
    pub fn target_config(&self) -> TargetConfig {
        if self.family == Family::Gpt2Simple {
            return TargetConfig::gpt2_simple(Gpt2Config {
                block_size: self.block_size,
                vocab_size: self.vocab_size,
                n_layer: self.n_layer,
                n_head: self.n_head,
                n_embd: self.n_embd,
            });
        }
        let d_mlp = if self.family == Family::LlamaSimple {
            3 * self.n_embd
        } else {
            4 * self.n_embd
        };
        TargetConfig::llama(
            self.family,
            LlamaConfig {
                block_size: self.block_size,
                vocab_size: self.vocab_size,
                n_layer: self.n_layer,
                n_head: self.n_head,
                n_embd: self.n_embd,
                n_intermediate: d_mlp,
                mlp_bias: self.biases,
                attn_bias: self.biases,
                rotary_adjacent_pairs: false,
                rotary_base: 10000.0,
                n_ctx: self.block_size,
                n_key_value_heads: self.n_kv_head.unwrap_or(self.n_head),
                use_grouped_query_attention: true,
                rms_norm_eps: 1e-6,
            },
        )
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

/// Builds a random model of `spec` with every projection decomposed, through the same
/// [`SpdModel::build`] as runs read from disk.
pub fn synthetic_model(spec: &SyntheticSpec) -> candle_core::Result<SpdModel> {
    let mut rng = Rng::new(spec.seed);
    let cfg = spec.target_config();
    let (d, v) = (cfg.n_embd, cfg.vocab_size);
    let mut t: HashMap<String, Tensor> = HashMap::new();
    t.insert("wte.weight".into(), randn(&mut rng, &[v, d], 0.5));
    if cfg.family == Family::Gpt2Simple {
        t.insert(
            "wpe.weight".into(),
            randn(&mut rng, &[spec.block_size, d], 0.1),
        );
    }
    let layer_norm = matches!(cfg.norm, NormKind::LayerNorm { .. });
    let norm = |t: &mut HashMap<String, Tensor>, rng: &mut Rng, name: &str| {
        let w: Vec<f32> = (0..d).map(|_| (1.0 + 0.2 * rng.normal()) as f32).collect();
        t.insert(
            format!("{name}.weight"),
            Tensor::new(w, &Device::Cpu).expect("vec"),
        );
        if layer_norm {
            t.insert(format!("{name}.bias"), randn(rng, &[d], 0.1));
        }
    };
    let (n1, n2) = if layer_norm {
        ("ln_1", "ln_2")
    } else {
        ("rms_1", "rms_2")
    };
    for i in 0..cfg.n_layer {
        norm(&mut t, &mut rng, &format!("h.{i}.{n1}"));
        norm(&mut t, &mut rng, &format!("h.{i}.{n2}"));
        for &kind in cfg.kinds() {
            let (d_in, d_out) = cfg.dims(kind);
            let p = format!("h.{i}.{}", kind.suffix());
            t.insert(
                format!("{p}.weight"),
                randn(&mut rng, &[d_out, d_in], 1.0 / (d_in as f64).sqrt()),
            );
            if cfg.has_bias(kind) {
                t.insert(format!("{p}.bias"), randn(&mut rng, &[d_out], 0.05));
            }
        }
    }
    norm(&mut t, &mut rng, "ln_f");
    let target = Transformer::new(cfg, &TensorFile::from_map(PathBuf::from("<synthetic>"), t))
        .map_err(candle_core::Error::wrap)?;

    let mut spd: HashMap<String, Tensor> = HashMap::new();
    let mut module_info = Vec::new();
    let mut identity_module_info = Vec::new();
    let mut shapes = Vec::new();
    let mut components = |rng: &mut Rng, name: String, d_in: usize, d_out: usize, c: usize| {
        let dash = name.replace('.', "-");
        spd.insert(
            format!("_components.{dash}.V"),
            randn(rng, &[d_in, c], 1.0 / (d_in as f64).sqrt()),
        );
        spd.insert(
            format!("_components.{dash}.U"),
            randn(rng, &[c, d_out], 1.0 / (c as f64).sqrt()),
        );
        if spec.global_ci.is_none() {
            layerwise_ci_tensors(&mut spd, rng, spec, &dash, d_in, c);
        }
        shapes.push((name, d_in, c));
    };
    for (i, id) in target.module_ids().enumerate() {
        let name = id.name();
        let c = spec.module_c.as_ref().map_or(spec.c, |cs| cs[i]);
        let lin = target.linear(id);
        let (d_in, d_out) = (lin.d_in(), lin.d_out());
        if spec.identities.iter().any(|p| glob_match(p, &name)) {
            components(&mut rng, id.identity().name(), d_in, d_in, spec.c);
            identity_module_info.push(ModuleInfo {
                module_pattern: name.clone(),
                c: spec.c,
            });
        }
        components(&mut rng, name.clone(), d_in, d_out, c);
        module_info.push(ModuleInfo {
            module_pattern: name,
            c,
        });
    }
    let ci = match &spec.global_ci {
        None => CiConfig::Layerwise {
            fn_type: spec.ci_fn_type,
            hidden_dims: spec.ci_hidden.clone(),
        },
        Some(g) => {
            global_ci_tensors(&mut spd, &mut rng, g, &shapes);
            CiConfig::Global(g.clone())
        }
    };
    let config = SpdConfig {
        module_info,
        identity_module_info,
        ci,
        sigmoid_type: SigmoidType::LeakyHard,
        sampling: Sampling::Continuous,
        use_delta_component: spec.use_delta_component,
        pretrained_model_class: spec.family.name().into(),
        pretrained_model_name: None,
        pretrained_model_path: None,
        tokenizer_name: None,
        task_config: TaskConfig::default(),
    };
    let f = TensorFile::from_map(PathBuf::from("<synthetic>"), spd);
    let mut model = SpdModel::build(config, std::path::Path::new("<synthetic>"), target, &f)
        .map_err(candle_core::Error::wrap)?;
    calibrate_ci_bias(&mut model, spec.ci_active_frac, &mut rng)?;
    Ok(model)
}

/// `_ci_fns.<dash>.layers.*` of a layerwise network.
fn layerwise_ci_tensors(
    spd: &mut HashMap<String, Tensor>,
    rng: &mut Rng,
    spec: &SyntheticSpec,
    dash: &str,
    d_in: usize,
    c: usize,
) {
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
                spd.insert(wk, randn(rng, &[w[0], w[1]], std));
                spd.insert(bk, randn(rng, &[w[1]], 0.1));
            }
            _ => {
                spd.insert(wk, randn(rng, &[c, w[0], w[1]], std));
                spd.insert(bk, randn(rng, &[c, w[1]], 0.1));
            }
        }
    }
}

/// `ci_fn._global_ci_fn.*` of a global shared MLP or shared transformer.
fn global_ci_tensors(
    spd: &mut HashMap<String, Tensor>,
    rng: &mut Rng,
    g: &GlobalCiConfig,
    shapes: &[(String, usize, usize)],
) {
    let p = "ci_fn._global_ci_fn.";
    let sum_in: usize = shapes.iter().map(|s| s.1).sum();
    let sum_c: usize = shapes.iter().map(|s| s.2).sum();
    let affine = |spd: &mut HashMap<String, Tensor>, rng: &mut Rng, key: String, a, b| {
        spd.insert(
            format!("{key}.W"),
            randn(rng, &[a, b], 1.0 / (a as f64).sqrt()),
        );
        spd.insert(format!("{key}.b"), randn(rng, &[b], 0.1));
    };
    match g.fn_type {
        GlobalCiFnType::SharedMlp => {
            let mut dims = vec![sum_in];
            dims.extend(&g.hidden_dims);
            dims.push(sum_c);
            for (l, w) in dims.windows(2).enumerate() {
                affine(spd, rng, format!("{p}layers.{}", 2 * l), w[0], w[1]);
            }
        }
        GlobalCiFnType::SharedTransformer => {
            let t = g.transformer.as_ref().expect("a transformer config");
            let dm = t.d_model;
            affine(spd, rng, format!("{p}_input_projector"), sum_in, dm);
            affine(spd, rng, format!("{p}_output_head"), dm, sum_c);
            let mut mlp = vec![dm];
            mlp.extend(&t.mlp_hidden_dim);
            mlp.push(dm);
            let dh = dm / t.attn_config.n_heads;
            let inv_freq: Vec<f32> = (0..dh / 2)
                .map(|i| 1.0 / (t.attn_config.rope_base as f32).powf(2.0 * i as f32 / dh as f32))
                .collect();
            for b in 0..t.n_blocks {
                for w in mlp.windows(2).enumerate() {
                    affine(
                        spd,
                        rng,
                        format!("{p}_blocks.{b}.mlp.{}", 2 * w.0),
                        w.1[0],
                        w.1[1],
                    );
                }
                for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
                    spd.insert(
                        format!("{p}_blocks.{b}.attn.{proj}.weight"),
                        randn(rng, &[dm, dm], 1.0 / (dm as f64).sqrt()),
                    );
                }
                spd.insert(
                    format!("{p}_blocks.{b}.attn.rope.inv_freq"),
                    Tensor::new(inv_freq.as_slice(), &Device::Cpu).expect("vec"),
                );
            }
        }
        GlobalCiFnType::ReverseResidual => {
            unimplemented!("synthetic reverse-residual CI networks are not built")
        }
    }
}

/// Shifts each CI network's final bias so that about `frac` of its outputs on random prompts are > 0.
fn calibrate_ci_bias(model: &mut SpdModel, frac: f64, rng: &mut Rng) -> candle_core::Result<()> {
    let t = model.block_size().min(32);
    let tokens: Vec<u32> = (0..4 * t)
        .map(|_| rng.below(model.vocab_size()) as u32)
        .collect();
    let batch = Tensor::from_slice(&tokens, (4, t), &Device::Cpu)?;
    let out = model.ci(&batch)?;
    let mut shifts = Vec::with_capacity(out.pre_sigmoid.len());
    for z in &out.pre_sigmoid {
        let mut zs: Vec<f32> = z.flatten_all()?.to_vec1()?;
        zs.sort_by(f32::total_cmp);
        shifts.push(-zs[((1.0 - frac) * (zs.len() - 1) as f64) as usize]);
    }
    if let Some(global) = &mut model.global_ci {
        return global.shift_output_bias(&shifts);
    }
    for (m, q) in model.modules.iter_mut().zip(shifts) {
        let ci_fn = m.ci_fn.as_mut().expect("a layerwise network");
        let (_, b) = ci_fn.layers.last_mut().expect("at least one layer");
        *b = (b.clone() + q as f64)?;
    }
    Ok(())
}
