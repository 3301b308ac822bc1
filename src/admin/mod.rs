//! The admin API, on its own listener (default `127.0.0.1:9090`): the keys' whole life over
//! REST + JSON, team membership, the audit log, the scope catalogue, and the health endpoints.
//! [`AdminApi::handle`] is the outer half (request id, envelope, error answers, log line);
//! [`AdminApi::route`] dispatches to one small handler per endpoint, each written with `?`.
//! The rules themselves live in [`crate::keys`], shared with the CLI.

pub mod auth;
pub mod error;
pub mod json;

use crate::auth::record::KeyRecord;
use crate::auth::record::KeyType;
use crate::auth::verify::Verifier;
use crate::client_ip::{canonical, client_ip};
use crate::config::{SCOPE_KEYS_READ, SCOPE_KEYS_WRITE, ScopeConfig};
use crate::keys::{
    Actor, CreateKey, KeyChange, KeyError, KeyService, LATEST_EXPIRY, parse_allow_ips,
};
use crate::metrics::Metrics;
use crate::request_id;
use crate::store::{AuditFilter, KeyFilter, Page, Role, StoreError};
use auth::{Admin, Standing};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use error::AdminError;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use ipnet::IpNet;
use serde_json::{Value, json};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

pub type AdminResponse = Response<Full<Bytes>>;

const DEFAULT_PER_PAGE: u32 = 20;
const MAX_PER_PAGE: u32 = 100;
const READY_PING_TIMEOUT: Duration = Duration::from_secs(2);
/// With `ready_without_store` the answer is "ready" whatever the ping says (it only picks the
/// reason), so the ping gets this long at most: well inside a kubelet's default 1 s probe
/// timeout, which a hung store would otherwise run out and make the replica unready.
const READY_PING_TIMEOUT_WITHOUT_STORE: Duration = Duration::from_millis(250);

pub struct AdminApi {
    pub service: KeyService,
    verifier: Arc<Verifier>,
    bootstrap: Option<Vec<u8>>,
    scopes: Vec<ScopeConfig>,
    trusted_proxies: Vec<IpNet>,
    max_body_bytes: usize,
    /// False until the listeners are up, and again from the moment shutdown begins.
    ready: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
    /// See `AdminConfig::ready_without_store`.
    pub ready_without_store: bool,
    /// See `AdminConfig::body_read_timeout`.
    pub body_read_timeout: Duration,
}

/// A successful answer: status and the `data` of the envelope, plus optional extra `meta`.
struct Reply {
    status: StatusCode,
    data: Value,
    meta: Option<serde_json::Map<String, Value>>,
}

impl Reply {
    fn ok(data: Value) -> Self {
        Self {
            status: StatusCode::OK,
            data,
            meta: None,
        }
    }
}

/// What a handler knows about the request.
struct Ctx<'a> {
    method: &'a Method,
    query: json::Query,
    body: Bytes,
    actor: Option<Admin>,
    client_ip: IpAddr,
    ids: &'a RequestIds,
    now: DateTime<Utc>,
}

/// A request's ids: `echoed` is the client's `X-Request-Id` when it sent a well-formed one
/// (answered and logged, so traces join up), else `made`; `made` is keygate's own, and the
/// only one the audit log records as the request id: a client-chosen id there would let an
/// admin forge a correlation with other entries. The client's goes in `client_request_id`.
struct RequestIds {
    echoed: HeaderValue,
    made: String,
    from_client: Option<String>,
}

impl RequestIds {
    fn of(headers: &http::HeaderMap) -> Self {
        let made = request_id::make();
        let from_client = request_id::from_client(headers);
        let text = |v: &HeaderValue| v.to_str().unwrap_or("").to_owned();
        Self {
            made: text(&made),
            from_client: from_client.as_ref().map(text),
            echoed: from_client.unwrap_or(made),
        }
    }

    fn echoed_text(&self) -> &str {
        self.from_client.as_deref().unwrap_or(&self.made)
    }
}

impl Ctx<'_> {
    fn admin(&self) -> Result<&Admin, AdminError> {
        self.actor.as_ref().ok_or(AdminError::Unauthenticated)
    }

    fn audit_actor(&self) -> Result<Actor, AdminError> {
        Ok(Actor {
            id: self.admin()?.actor_id.clone(),
            client_ip: Some(self.client_ip.to_string()),
            request_id: Some(self.ids.made.clone()),
            client_request_id: self.ids.from_client.clone(),
        })
    }

    fn page(&self) -> Result<Page, AdminError> {
        Ok(Page {
            page: self.query.u32_in(&["page"], 1, 1_000_000)?,
            per_page: self.query.u32_in(
                &["per_page", "perPage"],
                DEFAULT_PER_PAGE,
                MAX_PER_PAGE,
            )?,
        })
    }
}

fn paged_meta(page: Page, total: u64) -> serde_json::Map<String, Value> {
    let per = u64::from(page.per_page);
    let mut m = serde_json::Map::new();
    m.insert("total".into(), json!(total));
    m.insert("total_pages".into(), json!(total.div_ceil(per)));
    m.insert("per_page".into(), json!(page.per_page));
    m.insert("page".into(), json!(page.page));
    m
}

impl AdminApi {
    // Each argument is a distinct piece of wiring from `app::run`; a builder would add nothing.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        service: KeyService,
        verifier: Arc<Verifier>,
        bootstrap: Option<Vec<u8>>,
        scopes: Vec<ScopeConfig>,
        trusted_proxies: Vec<IpNet>,
        max_body_bytes: usize,
        ready: Arc<AtomicBool>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            service,
            verifier,
            bootstrap,
            scopes,
            trusted_proxies,
            max_body_bytes,
            ready,
            metrics,
            ready_without_store: false,
            body_read_timeout: Duration::from_secs(10),
        }
    }

    /// `GET /metrics`: Prometheus text format, no credential (scrapers carry none; the admin
    /// listener is kept inside the cluster).
    async fn metrics(&self) -> AdminResponse {
        self.metrics
            .set_cache_entries(self.verifier.cached_entries().await);
        self.metrics
            .set_change_feed_up(self.verifier.change_feed_connected());
        let up = matches!(
            tokio::time::timeout(READY_PING_TIMEOUT, self.service.store().ping()).await,
            Ok(Ok(()))
        );
        self.metrics.set_store_up(up);
        let mut resp = Response::new(Full::new(Bytes::from(self.metrics.render())));
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        );
        resp
    }

    pub async fn handle(&self, req: Request<Incoming>, peer: SocketAddr) -> AdminResponse {
        let ids = RequestIds::of(req.headers());
        let id = ids.echoed_text().to_owned();
        let request_id = ids.echoed.clone();
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        if path == "/metrics" && (method == Method::GET || method == Method::HEAD) {
            let mut resp = self.metrics().await;
            resp.headers_mut()
                .insert(request_id::HEADER.clone(), request_id);
            return without_body_for_head(&method, resp);
        }
        let result = self.dispatch(req, peer, &ids).await;
        let mut resp = match result {
            Ok(reply) => {
                let mut meta = reply.meta.unwrap_or_default();
                meta.insert("request_id".into(), json!(id));
                envelope(reply.status, json!({"meta": meta, "data": reply.data}))
            }
            Err(err) => {
                let (status, code) = err.status_and_code();
                if err.is_internal() {
                    tracing::error!(request_id = %id, error = %err, "admin request failed");
                }
                let mut resp = envelope(
                    status,
                    json!({
                        "meta": {"request_id": id},
                        "error": {"code": code, "message": err.public_message()},
                    }),
                );
                match &err {
                    AdminError::Unauthenticated | AdminError::InvalidCredential => {
                        let challenge = if matches!(err, AdminError::Unauthenticated) {
                            "Bearer realm=\"keygate-admin\""
                        } else {
                            "Bearer realm=\"keygate-admin\", error=\"invalid_token\""
                        };
                        resp.headers_mut().insert(
                            header::WWW_AUTHENTICATE,
                            HeaderValue::from_static(challenge),
                        );
                    }
                    AdminError::InsufficientScope(_) => {
                        resp.headers_mut().insert(
                            header::WWW_AUTHENTICATE,
                            HeaderValue::from_static(
                                "Bearer realm=\"keygate-admin\", error=\"insufficient_scope\"",
                            ),
                        );
                    }
                    AdminError::MethodNotAllowed(allow) => {
                        resp.headers_mut()
                            .insert(header::ALLOW, HeaderValue::from_static(allow));
                    }
                    AdminError::StoreUnavailable => {
                        resp.headers_mut()
                            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                    }
                    _ => {}
                }
                resp
            }
        };
        resp.headers_mut()
            .insert(request_id::HEADER.clone(), request_id);
        tracing::info!(
            target: "keygate::admin",
            request_id = %id,
            audit_request_id = %ids.made,
            method = %method,
            path = %path,
            status = resp.status().as_u16(),
            client = %peer.ip(),
        );
        without_body_for_head(&method, resp)
    }

    async fn dispatch(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
        ids: &RequestIds,
    ) -> Result<Reply, AdminError> {
        let peer_ip = canonical(peer.ip());
        let client_ip = client_ip(peer_ip, req.headers(), &self.trusted_proxies);
        let now = Utc::now();
        let segments: Vec<String> = req
            .uri()
            .path()
            .split('/')
            .filter(|s| !s.is_empty())
            .map(|s| {
                percent_encoding::percent_decode_str(s)
                    .decode_utf8()
                    .map(|c| c.into_owned())
                    .map_err(|_| AdminError::bad("path", "is not valid UTF-8"))
            })
            .collect::<Result<_, _>>()?;
        let segs: Vec<&str> = segments.iter().map(String::as_str).collect();
        let method = req.method().clone();

        // Health endpoints need no credential: probes do not carry one.
        match segs.as_slice() {
            ["healthz"] => return only_get(&method).map(|()| Reply::ok(json!({"status": "ok"}))),
            ["readyz"] => {
                only_get(&method)?;
                return self.readyz().await;
            }
            // `handle` answers GET and HEAD; `/metrics/` and the like are no endpoint.
            ["metrics"] => {
                only_get(&method)?;
                return Err(AdminError::NoEndpoint);
            }
            _ => {}
        }
        if !matches!(segs.first(), Some(&"v1")) {
            return Err(AdminError::NoEndpoint);
        }

        // The query is judged only once the caller is authenticated: an unauthenticated one
        // learns nothing about its validation (review), only 401. It is read first all the
        // same, to know whether the request reveals a value; a query that does not parse
        // reveals nothing, and is refused after authentication.
        let query = json::Query::parse(req.uri().query());
        // Revealing a key's value hands out a credential, as creating one does: a read-only
        // key could otherwise take the value of a write-capable one and write with it
        // (review).
        let reveals = query
            .as_ref()
            .is_ok_and(|q| q.bool("show_key_value").ok().flatten() == Some(true));
        let required = if (method == Method::GET || method == Method::HEAD) && !reveals {
            SCOPE_KEYS_READ
        } else {
            SCOPE_KEYS_WRITE
        };
        let mut actor = auth::authenticate(
            req.headers(),
            self.bootstrap.as_deref(),
            &self.verifier,
            client_ip,
            required,
            now,
        )
        .await?;
        if required == SCOPE_KEYS_WRITE {
            actor = self.as_stored(actor, client_ip, now).await?;
        }
        let query = query?;
        query.bool("show_key_value")?;
        let body = self.read_body(req).await?;
        let ctx = Ctx {
            method: &method,
            query,
            body,
            actor: Some(actor),
            client_ip,
            ids,
            now,
        };
        self.route(&segs[1..], &ctx).await
    }

    async fn route(&self, segs: &[&str], ctx: &Ctx<'_>) -> Result<Reply, AdminError> {
        let m = ctx.method;
        match segs {
            ["keys"] => match *m {
                Method::GET | Method::HEAD => self.list_keys(ctx).await,
                Method::POST => self.create_key(ctx).await,
                _ => Err(AdminError::MethodNotAllowed("GET, HEAD, POST")),
            },
            ["keys", id] => match *m {
                Method::GET | Method::HEAD => self.get_key(id, ctx).await,
                Method::PATCH => self.patch_key(id, ctx).await,
                Method::DELETE => self.delete_key(id, ctx).await,
                _ => Err(AdminError::MethodNotAllowed("GET, HEAD, PATCH, DELETE")),
            },
            ["keys", id, "rotate"] => match *m {
                Method::POST => self.rotate_key(id, ctx).await,
                _ => Err(AdminError::MethodNotAllowed("POST")),
            },
            ["scopes"] => match *m {
                Method::GET | Method::HEAD => Ok(Reply::ok(json!(self.scopes))),
                _ => Err(AdminError::MethodNotAllowed("GET, HEAD")),
            },
            ["teams", team, "members"] => match *m {
                Method::GET | Method::HEAD => self.list_members(team, ctx).await,
                _ => Err(AdminError::MethodNotAllowed("GET, HEAD")),
            },
            ["teams", team, "members", user] => match *m {
                Method::PUT => self.put_member(team, user, ctx).await,
                Method::DELETE => self.remove_member(team, user, ctx).await,
                _ => Err(AdminError::MethodNotAllowed("PUT, DELETE")),
            },
            ["audit"] => match *m {
                Method::GET | Method::HEAD => self.audit(ctx).await,
                _ => Err(AdminError::MethodNotAllowed("GET, HEAD")),
            },
            _ => Err(AdminError::NoEndpoint),
        }
    }

    async fn read_body(&self, req: Request<Incoming>) -> Result<Bytes, AdminError> {
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > self.max_body_bytes as u64) {
            return Err(AdminError::BodyTooLarge(self.max_body_bytes));
        }
        // Both judged only for a body: a GET or DELETE carrying them sends nothing to misread.
        let content_encoding = check_content_encoding(req.headers());
        let content_type = check_content_type(req.headers());
        // An admin client may hold its connection no longer than this: without it a body
        // trickled a byte at a time would never end.
        let collect = Limited::new(req.into_body(), self.max_body_bytes).collect();
        let collected = tokio::time::timeout(self.body_read_timeout, collect)
            .await
            .map_err(|_| AdminError::BodyTimeout(self.body_read_timeout))?
            .map_err(|e| {
                if e.downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some()
                {
                    AdminError::BodyTooLarge(self.max_body_bytes)
                } else {
                    AdminError::bad("body", format!("could not be read: {e}"))
                }
            })?
            .to_bytes();
        if !collected.is_empty() {
            content_encoding?;
            content_type?;
        }
        Ok(collected)
    }

    async fn readyz(&self) -> Result<Reply, AdminError> {
        if !self.ready.load(Ordering::Acquire) {
            return Ok(Reply {
                status: StatusCode::SERVICE_UNAVAILABLE,
                data: json!({"status": "not ready", "reason": "starting or shutting down"}),
                meta: None,
            });
        }
        let wait = if self.ready_without_store {
            READY_PING_TIMEOUT_WITHOUT_STORE
        } else {
            READY_PING_TIMEOUT
        };
        match tokio::time::timeout(wait, self.service.store().ping()).await {
            Ok(Ok(())) => Ok(Reply::ok(json!({"status": "ready"}))),
            _ if self.ready_without_store => Ok(Reply::ok(json!({
                "status": "ready",
                "reason": "key store unreachable; serving cached keys",
            }))),
            _ => Ok(Reply {
                status: StatusCode::SERVICE_UNAVAILABLE,
                data: json!({"status": "not ready", "reason": "key store unreachable"}),
                meta: None,
            }),
        }
    }

    /// Loads a key the admin may see; another team's key is "not found".
    async fn visible_key(&self, id: &str, ctx: &Ctx<'_>) -> Result<KeyRecord, AdminError> {
        let record = self.service.get(id).await?;
        if !ctx.admin()?.may_access(record.team_id.as_deref()) {
            return Err(crate::keys::KeyError::NotFound.into());
        }
        Ok(record)
    }

    /// A change is checked against the admin key's record in the store, not the verifier's
    /// cached copy: a key disabled, deleted or narrowed (scopes, `allow_ips`) a moment ago (on
    /// this gateway or another) changes nothing. The stored record passes the very rules
    /// `authenticate` applied to the cached one, with the same answers. Reads keep the cache's
    /// propagation window.
    async fn as_stored(
        &self,
        mut admin: Admin,
        client_ip: IpAddr,
        now: DateTime<Utc>,
    ) -> Result<Admin, AdminError> {
        if admin.is_bootstrap() {
            return Ok(admin);
        }
        let record = match self.service.get(&admin.actor_id).await {
            Ok(record) => record,
            Err(crate::keys::KeyError::NotFound) => return Err(AdminError::InvalidCredential),
            Err(e) => return Err(e.into()),
        };
        auth::authorize_stored(&record, client_ip, SCOPE_KEYS_WRITE, now)?;
        admin.team = record.team_id.clone();
        admin.held = record.team_id.is_some().then(|| auth::Held::of(&record));
        admin.record = Some(record);
        Ok(admin)
    }

    /// Where a team's admin key stands among the team's people; `None` for the operator (the
    /// bootstrap token, an admin key bound to no team), who may do anything.
    async fn standing(&self, ctx: &Ctx<'_>) -> Result<Option<Standing>, AdminError> {
        let admin = ctx.admin()?;
        let Some(team) = &admin.team else {
            return Ok(None);
        };
        let fetched;
        let own = match &admin.record {
            Some(own) => own,
            None => {
                fetched = self.service.get(&admin.actor_id).await?;
                &fetched
            }
        };
        let roles: Vec<(String, Role)> = self
            .service
            .list_members(team)
            .await?
            .into_iter()
            .map(|m| (m.user_id, m.role))
            .collect();
        // A shared key stands as a member whoever it acts for: any member may make one, and a
        // removed member's shared keys move to an owner (KeyService::remove_member).
        let role = match (own.key_type, &own.behalf_of_user_id) {
            (KeyType::User, Some(user)) => roles
                .iter()
                .find(|(u, _)| u == user)
                // Gone from the team (its user keys were disabled then): the least anyway.
                .map_or(Role::Member, |(_, r)| *r),
            _ => Role::Member,
        };
        Ok(Some(Standing {
            // A shared key has no self: the user it acts for may be whoever a removed member's
            // keys moved to (an owner), and keys for that user are not its to make.
            user: match own.key_type {
                KeyType::User => own.behalf_of_user_id.clone(),
                KeyType::Shared => None,
            },
            role,
            roles,
        }))
    }

    /// Whether this admin may manage a key acting for `user` ([`Standing::may_act_for`]);
    /// looks the team up only when there is a user to check.
    async fn may_act_for(&self, user: Option<&str>, ctx: &Ctx<'_>) -> Result<(), AdminError> {
        if user.is_none() {
            return Ok(());
        }
        match self.standing(ctx).await? {
            Some(standing) => standing.may_act_for(user),
            None => Ok(()),
        }
    }

    /// Loads a key this admin may act on: visible, acting for someone the admin may act for,
    /// and, unless the act only takes power away (`only_lowers`: disable, delete), within
    /// what the admin could hand out.
    async fn key_to_change(
        &self,
        id: &str,
        ctx: &Ctx<'_>,
        only_lowers: bool,
    ) -> Result<KeyRecord, AdminError> {
        let record = self.visible_key(id, ctx).await?;
        self.may_act_for(record.behalf_of_user_id.as_deref(), ctx)
            .await?;
        if !only_lowers {
            ctx.admin()?.may_hand_out(&record)?;
        }
        Ok(record)
    }

    /// What a change or rotation must still find the key to be (`KeyService::change_checked`,
    /// `KeyService::rotate`): the record `key_to_change` judged a team's admin on. `None` for
    /// the operator, whom no record can refuse: its change needs no such guard, and merges
    /// with concurrent ones as before.
    fn checked_against<'r>(
        &self,
        checked: &'r KeyRecord,
        ctx: &Ctx<'_>,
    ) -> Result<Option<&'r KeyRecord>, AdminError> {
        Ok(ctx.admin()?.team.is_some().then_some(checked))
    }

    fn visible_team(&self, team: &str, ctx: &Ctx<'_>) -> Result<(), AdminError> {
        if ctx.admin()?.may_access(Some(team)) {
            Ok(())
        } else {
            Err(AdminError::TeamNotFound(team.to_owned()))
        }
    }

    async fn list_keys(&self, ctx: &Ctx<'_>) -> Result<Reply, AdminError> {
        let q = &ctx.query;
        let key_type = q
            .str("key_type")
            .map(|t| {
                t.parse::<KeyType>()
                    .map_err(|_| AdminError::bad("key_type", "must be user or shared"))
            })
            .transpose()?;
        let mut team_id = q.str("team_id").map(str::to_owned);
        if let Some(t) = &team_id {
            self.visible_team(t, ctx)?;
        }
        if team_id.is_none() {
            team_id = ctx.admin()?.team.clone();
        }
        let filter = KeyFilter {
            team_id,
            key_type,
            is_enabled: q.bool("is_enabled")?,
        };
        let page = ctx.page()?;
        let (records, total) = self.service.list(&filter, page).await?;
        Ok(Reply {
            status: StatusCode::OK,
            data: Value::Array(records.iter().map(|r| json::key(r, false, None)).collect()),
            meta: Some(paged_meta(page, total)),
        })
    }

    async fn create_key(&self, ctx: &Ctx<'_>) -> Result<Reply, AdminError> {
        if ctx.body.is_empty() {
            return Err(AdminError::bad("body", "a JSON object is required"));
        }
        let body: json::CreateBody = json::parse_body(&ctx.body)?;
        let admin = ctx.admin()?;
        admin.may_grant(body.scope_names.iter().flatten())?;
        self.may_act_for(body.behalf_of_user_id.as_deref(), ctx)
            .await?;
        let team_id = match (body.team_id, &admin.team) {
            (Some(t), _) => {
                self.visible_team(&t, ctx)?;
                Some(t)
            }
            (None, own) => own.clone(),
        };
        if body.expires_in.is_some() && body.expires_at.is_some() {
            return Err(AdminError::bad(
                "expires_in",
                "give expires_in or expires_at, not both",
            ));
        }
        if body.expires_in.is_some_and(|d| d.is_zero()) {
            return Err(AdminError::bad("expires_in", "must be more than zero"));
        }
        let expires_time = match (body.expires_in, body.expires_at) {
            (Some(d), _) => Some(
                chrono::Duration::from_std(d)
                    .ok()
                    .and_then(|d| ctx.now.checked_add_signed(d))
                    .filter(|t| *t <= LATEST_EXPIRY)
                    .ok_or_else(|| {
                        AdminError::bad(
                            "expires_in",
                            "is too long: a key expires by 9999-12-31T23:59:59Z at the latest",
                        )
                    })?,
            ),
            (None, at) => at,
        };
        let allow_ips = parse_allow_ips(&body.allow_ips.unwrap_or_default())?;
        admin.may_grant_ips(&allow_ips)?;
        admin.may_grant_expiry(expires_time)?;
        let req = CreateKey {
            key_type: body.key_type,
            name: body.name,
            description: body.description,
            team_id,
            scope_names: body.scope_names.unwrap_or_default(),
            allow_ips,
            is_enabled: body.is_enabled.unwrap_or(true),
            behalf_of_user_id: body.behalf_of_user_id,
            expires_time,
            metadata: body.metadata.unwrap_or_default(),
        };
        let (key, record) = self
            .service
            .create(req, &ctx.audit_actor()?, ctx.now)
            .await?;
        Ok(Reply {
            status: StatusCode::CREATED,
            data: json::key(&record, true, Some(key.expose())),
            meta: None,
        })
    }

    async fn get_key(&self, id: &str, ctx: &Ctx<'_>) -> Result<Reply, AdminError> {
        let record = self.visible_key(id, ctx).await?;
        let value = if ctx.query.bool("show_key_value")? == Some(true) {
            // Checked for a HEAD too, whose status must be the GET's (review: 200 where the
            // GET was refused).
            ctx.admin()?.may_hand_out(&record)?;
            self.may_act_for(record.behalf_of_user_id.as_deref(), ctx)
                .await?;
            // A HEAD shows nothing, so it reveals nothing (and writes no reveal to the audit).
            match *ctx.method == Method::GET {
                true => {
                    self.service
                        .reveal(&record, &ctx.audit_actor()?, ctx.now)
                        .await?
                }
                false => None,
            }
        } else {
            None
        };
        let usage = self.service.usage(&record.api_key_id).await?;
        Ok(Reply::ok(json::key_with_usage(
            &record,
            true,
            value.as_deref().map(String::as_str),
            Some(&usage),
        )))
    }

    async fn patch_key(&self, id: &str, ctx: &Ctx<'_>) -> Result<Reply, AdminError> {
        let body: json::PatchBody = if ctx.body.is_empty() {
            json::PatchBody::default()
        } else {
            json::parse_body(&ctx.body)?
        };
        let checked = self.key_to_change(id, ctx, body.only_disables()).await?;
        let admin = ctx.admin()?;
        admin.may_grant(body.scope_names.iter().flatten())?;
        let allow_ips = body.allow_ips.map(|l| parse_allow_ips(&l)).transpose()?;
        if let Some(ips) = &allow_ips {
            admin.may_grant_ips(ips)?;
        }
        if let Some(expires) = body.expires_at {
            admin.may_grant_expiry(expires)?;
        }
        if let Some(user) = &body.behalf_of_user_id {
            self.may_act_for(user.as_deref(), ctx).await?;
        }
        // Read before the change, like GET shows it: a failed read then changes nothing.
        let usage = self.service.usage(id).await?;
        let change = KeyChange {
            name: body.name,
            description: body.description,
            scope_names: body.scope_names,
            allow_ips,
            is_enabled: body.is_enabled,
            behalf_of_user_id: body.behalf_of_user_id,
            expires_time: body.expires_at,
            metadata: body.metadata,
        };
        let record = self
            .service
            .change_checked(
                id,
                change,
                self.checked_against(&checked, ctx)?,
                &ctx.audit_actor()?,
                ctx.now,
            )
            .await?;
        Ok(Reply::ok(json::key_with_usage(
            &record,
            true,
            None,
            Some(&usage),
        )))
    }

    async fn delete_key(&self, id: &str, ctx: &Ctx<'_>) -> Result<Reply, AdminError> {
        let checked = match self.key_to_change(id, ctx, true).await {
            Ok(checked) => Some(checked),
            // A record that cannot be read cannot say whose key it is, so a team's admin may
            // not delete it (500, as before), but the operator, who may delete any key, must be
            // able to revoke it: on Redis its hash entries may still authenticate it.
            Err(AdminError::Key(KeyError::Store(StoreError::Corrupt(_))))
                if ctx.admin()?.team.is_none() =>
            {
                None
            }
            Err(e) => return Err(e),
        };
        let checked = match &checked {
            Some(checked) => self.checked_against(checked, ctx)?,
            None => None,
        };
        self.service
            .revoke_checked(id, checked, &ctx.audit_actor()?, ctx.now)
            .await?;
        Ok(Reply::ok(json!({"api_key_id": id, "deleted": true})))
    }

    async fn rotate_key(&self, id: &str, ctx: &Ctx<'_>) -> Result<Reply, AdminError> {
        let body: json::RotateBody = if ctx.body.is_empty() {
            json::RotateBody::default()
        } else {
            json::parse_body(&ctx.body)?
        };
        // The new value is the key's power: only for an admin who could grant all of it.
        let checked = self.key_to_change(id, ctx, false).await?;
        // Read before the rotation: its answer holds the only copy of the new value, so
        // nothing may fail after it.
        let usage = self.service.usage(id).await?;
        let (key, record) = self
            .service
            .rotate(
                id,
                Duration::from_secs(body.grace_seconds),
                self.checked_against(&checked, ctx)?,
                &ctx.audit_actor()?,
                ctx.now,
            )
            .await?;
        Ok(Reply::ok(json::key_with_usage(
            &record,
            true,
            Some(key.expose()),
            Some(&usage),
        )))
    }

    async fn list_members(&self, team: &str, ctx: &Ctx<'_>) -> Result<Reply, AdminError> {
        self.visible_team(team, ctx)?;
        let members = self.service.list_members(team).await?;
        Ok(Reply::ok(Value::Array(
            members.iter().map(json::member).collect(),
        )))
    }

    async fn put_member(&self, team: &str, user: &str, ctx: &Ctx<'_>) -> Result<Reply, AdminError> {
        self.visible_team(team, ctx)?;
        if ctx.body.is_empty() {
            return Err(AdminError::bad(
                "body",
                "a JSON object with a role is required",
            ));
        }
        let body: json::MemberBody = json::parse_body(&ctx.body)?;
        if let Some(standing) = self.standing(ctx).await? {
            standing.may_manage_member(user, Some(body.role))?;
        }
        let member = self
            .service
            .put_member(team, user, body.role, &ctx.audit_actor()?, ctx.now)
            .await?;
        Ok(Reply::ok(json::member(&member)))
    }

    async fn remove_member(
        &self,
        team: &str,
        user: &str,
        ctx: &Ctx<'_>,
    ) -> Result<Reply, AdminError> {
        self.visible_team(team, ctx)?;
        if let Some(standing) = self.standing(ctx).await? {
            standing.may_manage_member(user, None)?;
        }
        let changed = self
            .service
            .remove_member(team, user, &ctx.audit_actor()?, ctx.now)
            .await?;
        Ok(Reply::ok(json!({
            "team_id": team,
            "user_id": user,
            "removed": true,
            "changed_keys": changed.iter().map(|k| json::key(k, false, None)).collect::<Vec<_>>(),
        })))
    }

    async fn audit(&self, ctx: &Ctx<'_>) -> Result<Reply, AdminError> {
        let q = &ctx.query;
        let mut team_id = q.str("team_id").map(str::to_owned);
        if let Some(t) = &team_id {
            self.visible_team(t, ctx)?;
        }
        if team_id.is_none() {
            team_id = ctx.admin()?.team.clone();
        }
        let filter = AuditFilter {
            api_key_id: q.str("api_key_id").map(str::to_owned),
            team_id,
            since: q.time("since")?,
            until: q.time("until")?,
        };
        let page = ctx.page()?;
        let (events, total) = self.service.audit_log(&filter, page).await?;
        Ok(Reply {
            status: StatusCode::OK,
            data: Value::Array(events.iter().map(json::audit_event).collect()),
            meta: Some(paged_meta(page, total)),
        })
    }
}

/// A body's `Content-Type`: exactly one header, `application/json` (any case), and no
/// parameter but `charset=utf-8` (any case, quoted or not). Anything else is named in the 415:
/// `text/plain+json` and the like were once taken for JSON, a second header ignored, a
/// `charset=latin1` body read as UTF-8.
fn check_content_type(headers: &http::HeaderMap) -> Result<(), AdminError> {
    let refuse = |why: String| Err(AdminError::UnsupportedMediaType(why));
    let mut values = headers.get_all(header::CONTENT_TYPE).iter();
    let (Some(value), None) = (values.next(), values.next()) else {
        return match headers.get_all(header::CONTENT_TYPE).iter().count() {
            // Read as JSON: Java's HttpClient sends a body with none unless told (review), and
            // no browser can send a body without one across origins.
            0 => Ok(()),
            n => refuse(format!("{n} Content-Type headers; send exactly one")),
        };
    };
    let Ok(value) = value.to_str() else {
        return refuse("the Content-Type is not ASCII text".into());
    };
    let mut parts = value.split(';');
    let media = parts.next().unwrap_or("").trim();
    if !media.eq_ignore_ascii_case("application/json") {
        return refuse(format!("media type {media:?} is not application/json"));
    }
    for param in parts {
        let param = param.trim();
        // `application/json;` (a trailing `;`) has an empty parameter: nothing to judge.
        if param.is_empty() {
            continue;
        }
        let (name, val) = param.split_once('=').unwrap_or((param, ""));
        let (name, val) = (name.trim(), val.trim());
        if !name.eq_ignore_ascii_case("charset") {
            return refuse(format!(
                "parameter {param:?} is not allowed; only charset=utf-8 is"
            ));
        }
        let unquoted = val
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or(val);
        if !unquoted.eq_ignore_ascii_case("utf-8") && !unquoted.eq_ignore_ascii_case("utf8") {
            return refuse(format!("charset {val:?} is not utf-8"));
        }
    }
    Ok(())
}

/// A body must come as sent: keygate decodes no `Content-Encoding`, and reading a gzipped
/// body as JSON would only fail less clearly. `identity` (any case) is accepted.
fn check_content_encoding(headers: &http::HeaderMap) -> Result<(), AdminError> {
    for value in headers.get_all(header::CONTENT_ENCODING) {
        let text = value.to_str().unwrap_or("\u{fffd}");
        for coding in text.split(',').map(str::trim) {
            if !coding.eq_ignore_ascii_case("identity") {
                return Err(AdminError::UnsupportedMediaType(format!(
                    "Content-Encoding {coding:?} is not supported; send the body as is"
                )));
            }
        }
    }
    Ok(())
}

fn only_get(method: &Method) -> Result<(), AdminError> {
    if method == Method::GET || method == Method::HEAD {
        Ok(())
    } else {
        Err(AdminError::MethodNotAllowed("GET, HEAD"))
    }
}

/// A HEAD request's answer: the GET's status and headers, its `Content-Length` included, and
/// no body.
fn without_body_for_head(method: &Method, mut resp: AdminResponse) -> AdminResponse {
    if method == Method::HEAD {
        let length = http_body::Body::size_hint(resp.body()).exact().unwrap_or(0);
        resp.headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(length));
        *resp.body_mut() = Full::new(Bytes::new());
    }
    resp
}

fn envelope(status: StatusCode, body: Value) -> AdminResponse {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    /// `text/plain+json`, two Content-Types and `charset=latin1` were once taken for JSON.
    #[test]
    fn content_type_is_exactly_application_json_in_utf8() {
        for ok in [
            "application/json",
            "Application/JSON",
            "application/json; charset=utf-8",
            "application/json;charset=UTF-8",
            "application/json; charset=\"utf-8\"",
            "application/json; charset=utf8",
            "application/json;",
        ] {
            check_content_type(&headers(&[("content-type", ok)]))
                .unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for (bad, names) in [
            ("text/plain+json", "text/plain+json"),
            ("application/vnd.api+json", "vnd.api+json"),
            ("application/jsonx", "application/jsonx"),
            ("text/plain", "text/plain"),
            ("application/json; charset=latin1", "latin1"),
            ("application/json; charset=utf-16", "utf-16"),
            ("application/json; boundary=x", "boundary"),
            ("application/json; charset", "charset"),
            ("", "\"\""),
        ] {
            let e = check_content_type(&headers(&[("content-type", bad)])).unwrap_err();
            assert!(
                matches!(&e, AdminError::UnsupportedMediaType(m) if m.contains(names)),
                "{bad}: {e}"
            );
            assert_eq!(e.status_and_code().0, StatusCode::UNSUPPORTED_MEDIA_TYPE);
        }
        let two = headers(&[
            ("content-type", "application/json"),
            ("content-type", "application/json"),
        ]);
        let e = check_content_type(&two).unwrap_err();
        assert!(e.to_string().contains("2 Content-Type headers"), "{e}");
        // No Content-Type at all is read as JSON (Java's HttpClient sends none by default).
        check_content_type(&headers(&[])).unwrap();
    }

    #[test]
    fn content_encoding_other_than_identity_is_refused() {
        check_content_encoding(&headers(&[])).unwrap();
        check_content_encoding(&headers(&[("content-encoding", "Identity")])).unwrap();
        for bad in ["gzip", "identity, br", "deflate"] {
            let e = check_content_encoding(&headers(&[("content-encoding", bad)])).unwrap_err();
            assert!(
                matches!(&e, AdminError::UnsupportedMediaType(m) if m.contains("Content-Encoding")),
                "{bad}: {e}"
            );
        }
    }
}
