//! Node layers of a graph: the token embedding, a decomposed module, or the output logits.

use crate::model::SpdModel;

/// A layer of graph nodes. `Module(i)` indexes `SpdModel::modules`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Layer {
    Wte,
    Module(usize),
    Output,
}

impl Layer {
    /// The name on the wire: `wte`, the module path, or `output`.
    pub fn name(self, model: &SpdModel) -> &str {
        match self {
            Layer::Wte => "wte",
            Layer::Module(i) => &model.modules[i].name,
            Layer::Output => "output",
        }
    }

    pub fn parse(name: &str, model: &SpdModel) -> Option<Self> {
        match name {
            "wte" => Some(Layer::Wte),
            "output" => Some(Layer::Output),
            _ => model
                .modules
                .iter()
                .position(|m| m.name == name)
                .map(Layer::Module),
        }
    }

    /// Every layer in model order: `wte`, the modules, `output`.
    pub fn all(model: &SpdModel) -> impl Iterator<Item = Layer> {
        std::iter::once(Layer::Wte)
            .chain((0..model.modules.len()).map(Layer::Module))
            .chain(std::iter::once(Layer::Output))
    }

    /// A dense index over [`Layer::all`], for per-layer tables.
    pub fn index(self, n_modules: usize) -> usize {
        match self {
            Layer::Wte => 0,
            Layer::Module(i) => i + 1,
            Layer::Output => n_modules + 1,
        }
    }
}
