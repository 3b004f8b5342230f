//! `GET /v1/openapi.json`: the OpenAPI 3.1 document of this API.
//!
//! Query parameters come from the declarations the handlers parse with
//! ([`crate::params::Endpoint::params`]), so they cannot drift apart; an end-to-end test calls
//! every documented operation and parameter against the running server, and checks that an
//! undocumented parameter is refused.

use axum::Router;
use axum::routing::get;
use serde_json::{Value, json};

use crate::AppState;
use crate::params::{Endpoint, Kind, Param};

pub(crate) fn routes() -> Router<AppState> {
    Router::new().route("/v1/openapi.json", get(|| async { axum::Json(document()) }))
}

fn schema(kind: Kind) -> Value {
    match kind {
        Kind::Tenant => json!({"type": "string", "pattern": "^[a-z0-9][a-z0-9_-]{0,62}$"}),
        Kind::List | Kind::Actions => json!({"type": "string", "description": "comma-separated"}),
        Kind::Outcomes => {
            json!({"type": "string", "description": "comma-separated: success, failure, denied, unknown"})
        }
        Kind::Timestamp => json!({"type": "string", "format": "date-time"}),
        Kind::Order => json!({"type": "string", "enum": ["desc", "asc"], "default": "desc"}),
        Kind::Integer { min, max, default } => {
            json!({"type": "integer", "minimum": min, "maximum": max, "default": default})
        }
        Kind::Cursor => json!({"type": "string"}),
        Kind::Size => json!({"type": "integer", "minimum": 0}),
        Kind::Duration => json!({"type": "string", "examples": ["5m", "1h", "1d"]}),
    }
}

fn parameters(endpoint: Endpoint) -> Vec<Value> {
    let mut out = Vec::new();
    for p in endpoint.params() {
        out.push(query_param(p, p.name, p.description));
        if p.negatable {
            let name: &'static str = match p.name {
                "actor" => "actor!",
                "target" => "target!",
                "source" => "source!",
                "outcome" => "outcome!",
                _ => "action!",
            };
            out.push(query_param(
                p,
                name,
                "Excludes events matching these values.",
            ));
        }
    }
    out
}

fn query_param(p: &Param, name: &str, description: &str) -> Value {
    json!({
        "name": name,
        "in": "query",
        "required": false,
        "description": description,
        "schema": schema(p.kind),
    })
}

fn error_responses(codes: &[&str]) -> serde_json::Map<String, Value> {
    codes
        .iter()
        .map(|code| {
            let description = match *code {
                "400" => "A parameter is invalid; `error.param` names it.",
                "401" => "No token, or an unknown one.",
                "403" => "The token may not act on this tenant, or lacks the scope.",
                "404" => "Not found: no such event for this token, or no such webhook source.",
                "413" => "The body is larger than the configured limit.",
                "429" => "The token's share of the database is in use by its other requests; retry after `Retry-After` seconds.",
                _ => "PostgreSQL or NATS cannot answer now; retry.",
            };
            let mut answer = json!({"description": description, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}});
            if *code == "429" {
                answer["headers"] = json!({"Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "integer"}}});
            }
            ((*code).to_owned(), answer)
        })
        .collect()
}

fn responses(ok: Value, errors: &[&str]) -> Value {
    let mut map = error_responses(errors);
    map.insert("200".into(), ok);
    Value::Object(map)
}

/// The answers of the routes that write events.
fn ingest_responses() -> Value {
    let mut map = error_responses(&["401", "403", "404", "413", "503"]);
    let results = json!({"content": {"application/json": {"schema": {"$ref": "#/components/schemas/IngestResult"}}}});
    let mut accepted = results.clone();
    accepted["description"] = "At least one event accepted (published and acknowledged by JetStream); `results` says which.".into();
    let mut none = results;
    none["description"] = "No event in the request was valid (or the request itself was malformed); `results` or `error` says why.".into();
    map.insert("202".into(), accepted);
    map.insert("400".into(), none);
    Value::Object(map)
}

/// The whole document.
pub(crate) fn document() -> Value {
    let security = json!([{"bearer": []}]);
    let read_errors = ["400", "401", "403", "429", "503"];
    let proof_parameters: Vec<Value> = std::iter::once(json!({
        "name": "id", "in": "path", "required": true,
        "schema": {"type": "string", "format": "uuid"}
    }))
    .chain(parameters(Endpoint::Proof))
    .collect();
    let mut stream_parameters = parameters(Endpoint::Stream);
    stream_parameters.push(
        json!({"name": "Last-Event-ID", "in": "header", "required": false,
        "description": "Resume after this event id (takes precedence over `cursor`).",
        "schema": {"type": "string"}}),
    );
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "Auditbridge API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Query a tenant's audit trail, tail it live, and chart it. Every /v1 route except this document needs `Authorization: Bearer <token>`; a token reads one tenant (or, marked admin, any).",
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {"error": {"type": "object", "required": ["code", "message"], "properties": {
                        "code": {"type": "string"}, "message": {"type": "string"},
                        "param": {"type": "string", "description": "The parameter at fault (400)."}
                    }}}
                },
                "Event": {
                    "type": "object",
                    "description": "An audit event, format v1, as stored.",
                    "required": ["id", "tenant", "occurred_at", "action", "outcome", "actor", "source"],
                    "properties": {
                        "id": {"type": "string", "format": "uuid"},
                        "tenant": {"type": "string"},
                        "occurred_at": {"type": "string", "format": "date-time"},
                        "action": {"type": "string"},
                        "outcome": {"type": "string", "enum": ["success", "failure", "denied", "unknown"]},
                        "actor": {"type": "object", "required": ["id"]},
                        "target": {"type": "object"},
                        "source": {"type": "string"},
                        "reason": {"type": "string"},
                        "request_id": {"type": "string"},
                        "metadata": {"type": "object"}
                    }
                },
                "IngestResult": {
                    "type": "object",
                    "properties": {
                        "accepted": {"type": "integer"},
                        "rejected": {"type": "integer"},
                        "results": {"type": "array", "items": {"type": "object", "properties": {
                            "index": {"type": "integer", "description": "Position in the request (line, or array item)."},
                            "id": {"type": "string", "format": "uuid"},
                            "status": {"type": "string", "enum": ["accepted", "rejected"]},
                            "kind": {"type": "string"},
                            "reason": {"type": "string"}
                        }}}
                    }
                },
                "EventPage": {
                    "type": "object",
                    "required": ["events", "next_cursor"],
                    "properties": {
                        "events": {"type": "array", "items": {"$ref": "#/components/schemas/Event"}},
                        "next_cursor": {"type": ["string", "null"], "description": "Pass as `cursor` for the next page; null on the last page."}
                    }
                },
                "Counts": {
                    "type": "object",
                    "properties": {
                        "total": {"type": "integer"},
                        "by_action": {"type": "object", "additionalProperties": {"type": "integer"}},
                        "by_outcome": {"type": "object", "additionalProperties": {"type": "integer"}}
                    }
                },
                "InclusionProof": {
                    "type": "object",
                    "properties": {
                        "id": {"type": "string", "format": "uuid"},
                        "tenant": {"type": "string"},
                        "log_index": {"type": "integer"},
                        "tree_size": {"type": "integer"},
                        "leaf_hash": {"type": "string", "contentEncoding": "base64"},
                        "hashes": {"type": "array", "items": {"type": "string", "contentEncoding": "base64"}},
                        "checkpoint": {"type": ["string", "null"]}
                    }
                },
                "ConsistencyProof": {
                    "type": "object",
                    "properties": {
                        "tenant": {"type": "string"},
                        "from": {"type": "integer"},
                        "to": {"type": "integer"},
                        "hashes": {"type": "array", "items": {"type": "string", "contentEncoding": "base64"}},
                        "checkpoint": {"type": ["string", "null"]}
                    }
                },
                "Stats": {
                    "allOf": [{"$ref": "#/components/schemas/Counts"}, {
                        "type": "object",
                        "properties": {
                            "tenant": {"type": "string"},
                            "since": {"type": "string", "format": "date-time"},
                            "until": {"type": "string", "format": "date-time"},
                            "bucket_seconds": {"type": "integer"},
                            "depth": {"type": "integer"},
                            "buckets": {"type": "array", "items": {"allOf": [
                                {"$ref": "#/components/schemas/Counts"},
                                {"type": "object", "properties": {"start": {"type": "string", "format": "date-time"}}}
                            ]}}
                        }
                    }]
                }
            }
        },
        "paths": {
            "/v1/events": {"get": {
                "operationId": "listEvents",
                "summary": "A page of one tenant's events, newest first by default.",
                "security": security,
                "parameters": parameters(Endpoint::Events),
                "responses": responses(json!({"description": "One page.", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/EventPage"}}}}), &read_errors),
            }},
            "/v1/events/{id}": {"get": {
                "operationId": "getEvent",
                "summary": "One stored event (404 also for another tenant's id).",
                "security": security,
                "parameters": [{"name": "id", "in": "path", "required": true, "schema": {"type": "string", "format": "uuid"}}],
                "responses": responses(json!({"description": "The event as stored.", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Event"}}}}), &["400", "401", "403", "404", "429", "503"]),
            }},
            "/v1/events/{id}/proof": {"get": {
                "operationId": "eventProof",
                "summary": "The event's RFC 9162 inclusion proof in its tenant's verifiable log: its log index, the tree size, its leaf hash (SHA-256 of 0x00 and the exact body of GET /v1/events/{id}) and the proof hashes (base64, nearest the leaf first). Without `size`, against the tenant's newest signed checkpoint, which comes along as `checkpoint` (a C2SP signed note). 404 also for another tenant's event; 503 while there is no signed checkpoint covering it.",
                "security": security,
                "parameters": proof_parameters,
                "responses": responses(json!({"description": "The proof.", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/InclusionProof"}}}}), &["400", "401", "403", "404", "429", "503"]),
            }},
            "/v1/log/checkpoint": {"get": {
                "operationId": "logCheckpoint",
                "summary": "The tenant's newest signed checkpoint: a C2SP tlog-checkpoint (origin `<log name>/<tenant>`, tree size, base64 root) as a C2SP signed note, with an Ed25519 signature and a timestamped tlog-cosignature line by the same key (when it was signed). 503 naming AUDITBRIDGE_LOG_KEY_FILE when none is signed.",
                "security": security,
                "parameters": parameters(Endpoint::Checkpoint),
                "responses": responses(json!({"description": "The signed note.", "content": {"text/plain": {"schema": {"type": "string"}}}}), &read_errors),
            }},
            "/v1/log/consistency": {"get": {
                "operationId": "logConsistency",
                "summary": "An RFC 9162 consistency proof that the tenant's tree of `from` leaves is a prefix of its tree of `to` leaves (default: the newest signed checkpoint's size, which comes along as `checkpoint`). Hashes are base64.",
                "security": security,
                "parameters": parameters(Endpoint::Consistency),
                "responses": responses(json!({"description": "The proof.", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ConsistencyProof"}}}}), &read_errors),
            }},
            "/v1/log/receipts": {"get": {
                "operationId": "logReceipts",
                "summary": "The tenant's retention receipts, oldest first: one per partition expiry dropped, naming the partition, the policy (`keep_seconds`), the count, the log indexes (half-open ranges) and times of the events that left, those not yet logged or delivered, and the tenant's checkpoint at the cut (`tree_size`); `note` is the receipt as a C2SP signed note by the log's key (`signed`: false when no key was configured).",
                "security": security,
                "parameters": parameters(Endpoint::Receipts),
                "responses": responses(json!({"description": "The receipts.", "content": {"application/json": {"schema": {"type": "object"}}}}), &read_errors),
            }},
            "/v1/events/stream": {"get": {
                "operationId": "streamEvents",
                "summary": "Live tail as Server-Sent Events: replays after the cursor, then follows new commits. Events are `event: audit` with the event as data and its stream position as `id`; `event: caught-up` marks the end of the replay; comments are heartbeats.",
                "security": security,
                "parameters": stream_parameters,
                "responses": responses(json!({"description": "An event stream.", "content": {"text/event-stream": {"schema": {"type": "string"}}}}), &read_errors),
            }},
            "/v1/stats": {"get": {
                "operationId": "stats",
                "summary": "Counts by action (at a depth of the hierarchy) and by outcome, per time bucket.",
                "security": security,
                "parameters": parameters(Endpoint::Stats),
                "responses": responses(json!({"description": "Counts.", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Stats"}}}}), &read_errors),
            }},
            "/v1/ingest": {"post": {
                "operationId": "ingest",
                "summary": "Write events: one v1 event (application/json) or one per line (application/x-ndjson). Each is validated; the valid ones are published to JetStream and acknowledged by it before the answer. Needs a token with the `ingest` scope for every event's tenant (one foreign event refuses the whole request, nothing published).",
                "security": security,
                "requestBody": {"required": true, "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/Event"}},
                    "application/x-ndjson": {"schema": {"type": "string", "description": "One event per line."}}
                }},
                "responses": ingest_responses(),
            }},
            "/v1/webhooks/{source}": {"post": {
                "operationId": "webhook",
                "summary": "A signed delivery from a configured webhook source (`[[sources]]`, type webhook): the signature (HMAC-SHA256) is checked on the raw body, the payload (an object or an array of objects) is mapped to v1 events with ids derived from the source's own ids, and published like /v1/ingest. Authenticated by the signature, not a bearer token.",
                "parameters": [{"name": "source", "in": "path", "required": true, "schema": {"type": "string"}}],
                "requestBody": {"required": true, "content": {"application/json": {"schema": {}}}},
                "responses": ingest_responses(),
            }},
            "/v1/openapi.json": {"get": {
                "operationId": "openapi",
                "summary": "This document.",
                "responses": {"200": {"description": "OpenAPI 3.1", "content": {"application/json": {}}}},
            }},
        }
    })
}
