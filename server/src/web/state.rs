//! What the server holds while it runs.

use super::service::Service;
use app::api::ExplorerHandle;
use axum::extract::FromRef;
use leptos::config::LeptosOptions;
use std::sync::Arc;

/// The axum router state; server functions get the service through Leptos context.
#[derive(Clone)]
pub struct AppState {
    pub leptos_options: LeptosOptions,
    pub service: Service,
}

impl AppState {
    pub fn new(leptos_options: LeptosOptions, service: Service) -> Self {
        AppState {
            leptos_options,
            service,
        }
    }

    pub fn explorer(&self) -> ExplorerHandle {
        ExplorerHandle(Arc::new(self.service.clone()))
    }
}

impl FromRef<AppState> for LeptosOptions {
    fn from_ref(state: &AppState) -> Self {
        state.leptos_options.clone()
    }
}
