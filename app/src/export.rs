//! The exported JSON of a view: the drawn graph (the wire `GraphData`'s fields, so scripts read it
//! as a graph), plus what a researcher added — the view's URL form, the labels of the graph's
//! components and the supernodes — so that dropping the file on the page opens the same view again.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::canvas::scene::component_of;
use crate::state::ViewState;
use crate::types::GraphData;

/// A supernode as exported.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExportedGroup {
    pub label: String,
    pub members: Vec<String>,
    pub open: bool,
}

/// What an export adds beside the graph's own fields.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Additions {
    /// The view's query string (`ViewState::to_query`).
    pub view: String,
    /// Labels of the graph's components, `layer:c` → label.
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    pub supernodes: Vec<ExportedGroup>,
}

#[derive(Serialize)]
struct Export<'a> {
    #[serde(flatten)]
    graph: &'a GraphData,
    #[serde(flatten)]
    additions: Additions,
}

/// The export of `graph` drawn in `view`, with the `labels` of its components.
pub fn export(graph: &GraphData, view: &ViewState, labels: &HashMap<String, String>) -> String {
    let labels = graph
        .nodes
        .iter()
        .map(|n| component_of(&n.key))
        .filter_map(|c| labels.get(&c).map(|l| (c, l.clone())))
        .collect();
    let supernodes = view
        .groups
        .iter()
        .map(|g| ExportedGroup {
            label: g.label.clone(),
            members: g.members.clone(),
            open: g.open,
        })
        .collect();
    let doc = Export {
        graph,
        additions: Additions {
            view: view.to_query(),
            labels,
            supernodes,
        },
    };
    serde_json::to_string_pretty(&doc).unwrap_or_default()
}

/// The view and labels of an exported file; an error says why a file is not one.
pub fn import(text: &str) -> Result<(ViewState, Vec<(String, String)>), String> {
    let additions: Additions = serde_json::from_str(text)
        .map_err(|e| format!("not an exported view of this explorer: {e}"))?;
    let view = ViewState::from_query(&additions.view);
    Ok((view, additions.labels.into_iter().collect()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::supernode::Group;
    use crate::types::{PromptRef, test_graph};

    #[test]
    fn an_exported_view_imports_back_with_its_labels_and_supernodes() {
        let g = test_graph(
            3,
            1,
            &["wte:0:0", "h.0.mlp.c_fc:1:4", "h.0.mlp.c_fc:2:5"],
            0.5,
            &[("wte:0:0", "h.0.mlp.c_fc:1:4", 1.0)],
        );
        let view = ViewState {
            prompt: PromptRef::Stored(7),
            pins: vec!["h.0.mlp.c_fc:4".into()],
            groups: vec![Group {
                label: "pair".into(),
                members: vec!["h.0.mlp.c_fc:1:4".into(), "h.0.mlp.c_fc:2:5".into()],
                open: false,
            }],
            ..ViewState::default()
        };
        let labels: HashMap<String, String> = [
            ("h.0.mlp.c_fc:4".to_owned(), "names".to_owned()),
            ("h.1.mlp.c_fc:9".to_owned(), "not in this graph".to_owned()),
        ]
        .into();
        let text = export(&g, &view, &labels);
        // Still a graph to whoever reads it as one.
        let as_graph: GraphData = serde_json::from_str(&text).unwrap();
        assert_eq!(as_graph, g);
        let raw: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(raw["supernodes"][0]["label"], "pair");
        let (back, labels) = import(&text).unwrap();
        assert_eq!(back, view);
        assert_eq!(
            labels,
            vec![("h.0.mlp.c_fc:4".to_owned(), "names".to_owned())]
        );
        assert!(
            import("{\"nodes\": []}")
                .unwrap_err()
                .contains("not an exported view")
        );
        assert!(import("not json").is_err());
    }
}
