//! The OpenAPI document of the HTTP face, generated from the handlers' annotations and the
//! shapes' types, so that clients in any language can be generated from `/openapi.json`.

use axum::Json;
use utoipa::OpenApi;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};

use super::routes;
use super::shapes::*;
use super::ws;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "ClaudeCluster HTTP API",
        description = "The original ClaudeCluster REST and WebSocket API, served by the driver over the same service as its gRPC API. Once the driver has API keys, every call but the health probes presents one: `Authorization: Bearer <key>` or `X-API-Key: <key>` (WebSockets may send `?key=`)."
    ),
    paths(
        routes::health, routes::ready, routes::live, routes::stats,
        routes::submit, routes::submit_batch, routes::list, routes::task, routes::result,
        routes::progress, routes::events, routes::remove, routes::cancel,
        routes::workers, routes::worker, routes::worker_health,
        routes::sessions, routes::session,
        ws::task_progress, ws::stats,
    ),
    components(schemas(EventJson, Outcome, StatsJson, Frame)),
    modifiers(&Security),
    tags(
        (name = "tasks", description = "Tasks in the original's shapes"),
        (name = "cluster", description = "Workers and the cluster's stats"),
        (name = "sessions", description = "Sessions (ours)"),
        (name = "websockets", description = "Live progress and stats"),
        (name = "health", description = "Probes; no key needed"),
    )
)]
struct ApiDoc;

struct Security;

impl utoipa::Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        components.add_security_scheme(
            "apiKey",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("X-API-Key"))),
        );
    }
}

/// The document, built once.
pub fn spec() -> &'static utoipa::openapi::OpenApi {
    static SPEC: std::sync::OnceLock<utoipa::openapi::OpenApi> = std::sync::OnceLock::new();
    SPEC.get_or_init(ApiDoc::openapi)
}

pub(super) async fn document() -> Json<&'static utoipa::openapi::OpenApi> {
    Json(spec())
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_route_is_documented() {
        let spec = super::spec();
        for path in [
            "/health",
            "/health/ready",
            "/health/live",
            "/stats",
            "/tasks",
            "/tasks/batch",
            "/tasks/{taskId}",
            "/tasks/{taskId}/result",
            "/tasks/{taskId}/progress",
            "/tasks/{taskId}/events",
            "/tasks/{taskId}/cancel",
            "/workers",
            "/workers/{workerId}",
            "/workers/{workerId}/health",
            "/sessions",
            "/sessions/{sessionId}",
            "/ws/tasks/{taskId}/progress",
            "/ws/stats",
        ] {
            assert!(
                spec.paths.paths.contains_key(path),
                "{path} is not in the document"
            );
        }
        let json = serde_json::to_value(spec).unwrap();
        assert!(json["components"]["schemas"]["TaskJson"].is_object());
    }
}
