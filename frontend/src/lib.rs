//! WebAssembly hydrate entry.

use wasm_bindgen::prelude::wasm_bindgen;

/// Called by the script cargo-leptos generates: makes the server-rendered page interactive.
#[wasm_bindgen]
pub fn hydrate() {
    console_error_panic_hook::set_once();
    leptos::mount::hydrate_body(app::App);
}
