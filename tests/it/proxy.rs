//! The request path end to end on the embedded store: a real gateway process, a real echo
//! upstream, real HTTP clients.

use crate::support::gateway::Gateway;
use crate::support::{
    cli, client, create_key, empty_stream_body, eventually, h2_client, raw_exchange, service,
    upstream,
};
use keygate::store::KeyStore;
use keygate::store::embedded::EmbeddedStore;
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;

struct Env {
    store: Arc<dyn KeyStore>,
    gw: Gateway,
    /// The echo upstream's `host:port`.
    echo: String,
    _dir: tempfile::TempDir,
}

async fn env_with(proxy_section: &str) -> Env {
    env_started(proxy_section, Gateway::start).await
}

async fn env_started(proxy_section: &str, start: impl FnOnce(&str) -> Gateway) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("keys.db");
    let echo = upstream::echo().await;
    let silent = upstream::silent().await;
    let closed = upstream::closed();
    let config = format!(
        r#"
        [proxy]
        {proxy_section}
        [store]
        kind = "embedded"
        path = "{db}"
        [upstreams.echo]
        url = "http://{echo}"
        [upstreams.based]
        url = "http://{echo}/base/"
        [upstreams.down]
        url = "http://{closed}"
        [upstreams.slow]
        url = "http://{silent}"
        response_timeout = "300ms"
        [[routes]]
        name = "public"
        path_prefix = "/public"
        upstream = "echo"
        public = true
        [[routes]]
        name = "admin"
        path_prefix = "/admin"
        upstream = "echo"
        scopes = ["admin"]
        [[routes]]
        name = "query"
        path_prefix = "/q"
        upstream = "echo"
        sources = ["query", "bearer"]
        [[routes]]
        name = "keep"
        path_prefix = "/keep"
        upstream = "echo"
        keep_credential = true
        [[routes]]
        name = "based"
        path_prefix = "/based"
        upstream = "based"
        [[routes]]
        name = "limited"
        path_prefix = "/limited"
        upstream = "echo"
        max_body_bytes = 1000
        [[routes]]
        name = "down"
        path_prefix = "/down"
        upstream = "down"
        [[routes]]
        name = "slow"
        path_prefix = "/slow"
        upstream = "slow"
        [[routes]]
        name = "writes"
        path_prefix = "/api"
        methods = ["POST", "DELETE"]
        upstream = "echo"
        scopes = ["write"]
        [[routes]]
        name = "api"
        path_prefix = "/api"
        upstream = "echo"
        "#,
        db = db.display()
    );
    let store: Arc<dyn KeyStore> = Arc::new(EmbeddedStore::open(&db).unwrap());
    let gw = start(&config);
    Env {
        store,
        gw,
        echo: echo.to_string(),
        _dir: dir,
    }
}

async fn env() -> Env {
    env_with("trusted_proxies = [\"127.0.0.1/32\"]").await
}

fn www_auth(r: &reqwest::Response) -> String {
    r.headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

async fn error_code(r: reqwest::Response) -> String {
    let v: Value = r.json().await.unwrap();
    assert!(v["meta"]["request_id"].is_string(), "{v}");
    v["error"]["code"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn valid_key_reaches_upstream_with_identity_and_without_credential() {
    let e = env().await;
    service(&e.store)
        .put_member(
            "team1",
            "user-7",
            keygate::store::Role::Member,
            &cli(),
            chrono::Utc::now(),
        )
        .await
        .unwrap();
    let (key, record) = create_key(&e.store, |r| {
        r.scope_names = vec!["read".into()];
        r.key_type = keygate::auth::record::KeyType::User;
        r.behalf_of_user_id = Some("user-7".into());
    })
    .await;
    let r = client()
        .get(e.gw.url("/api/items?x=1"))
        .bearer_auth(&key)
        .header("x-keygate-key-id", "apk_forged")
        .header("x-keygate-scopes", "admin")
        .header("x-request-id", "trace-123")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-request-id"], "trace-123");
    let seen: Value = r.json().await.unwrap();
    let h = &seen["headers"];
    assert_eq!(seen["path"], "/api/items");
    assert_eq!(seen["query"], "x=1");
    assert_eq!(h["x-keygate-key-id"][0], record.api_key_id.as_str());
    assert_eq!(h["x-keygate-key-id"].as_array().unwrap().len(), 1);
    assert_eq!(h["x-keygate-team-id"][0], "team1");
    assert_eq!(h["x-keygate-user-id"][0], "user-7");
    assert_eq!(h["x-keygate-key-type"][0], "user");
    assert_eq!(h["x-keygate-scopes"][0], "read");
    assert_eq!(h["x-request-id"][0], "trace-123");
    assert_eq!(h["x-forwarded-for"][0], "127.0.0.1");
    assert_eq!(h["x-forwarded-proto"][0], "http");
    assert!(
        h.get("authorization").is_none(),
        "credential forwarded: {h}"
    );
    assert!(!seen.to_string().contains(&key), "key leaked upstream");
}

/// One HTTP/1.1 request written as given (no client rewrites the path): the status and the
/// body. The connection closes after it.
async fn raw_request(addr: std::net::SocketAddr, head: String) -> (u16, String) {
    let request = format!("{head}Connection: close\r\n\r\n");
    let (status_line, body) = raw_exchange(addr, request.as_bytes()).await;
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, body)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_path_spelled_differently_meets_its_own_route_or_a_400() {
    let e = env().await;
    // No "admin" scope: /admin is closed to this key, and stays closed however it is spelled.
    let (key, _) = create_key(&e.store, |_| {}).await;
    let get = |path: &str| {
        raw_request(
            e.gw.addr,
            format!("GET {path} HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {key}\r\n"),
        )
    };
    assert_eq!(get("/admin/secret").await.0, 403);
    // Percent-encoding is decoded before routes are matched.
    let (status, body) = get("/%61dmin/secret").await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("API_KEY_SCOPE_INSUFFICIENT"), "{body}");
    for path in [
        "/x/../admin/secret",
        "/public/../admin/secret",
        "/./admin/secret",
        "/%2e%2e/admin/secret",
        "//admin/secret",
        "/admin;x/secret",
        "/admin%2fsecret",
        "/admin\\secret",
        "/%2561dmin/secret",
    ] {
        let (status, body) = get(path).await;
        assert_eq!(status, 400, "{path}: {body}");
        assert!(body.contains("PATH_NOT_CANONICAL"), "{path}: {body}");
    }
    // Without a key either: a public route's prefix does not open another route.
    let (status, _) = raw_request(
        e.gw.addr,
        "GET /public/../admin/secret HTTP/1.1\r\nHost: t\r\n".into(),
    )
    .await;
    assert_eq!(status, 400);
    // Plain paths with dots in their names are fine.
    let (status, body) = get("/api/v1.2/..files").await;
    assert_eq!(status, 200, "{body}");
}

/// A method spelled as the upstream's framework reads it meets that method's route: `post`
/// is Flask's and Rack's POST, so it needs the `writes` route's scope, not the wider `api`'s.
#[tokio::test(flavor = "multi_thread")]
async fn a_method_in_lowercase_meets_its_route() {
    let e = env().await;
    let (key, _) = create_key(&e.store, |_| {}).await;
    let send = |method: &str| {
        raw_request(
            e.gw.addr,
            format!("{method} /api/x HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {key}\r\n"),
        )
    };
    for method in ["POST", "post", "Post", "delete"] {
        let (status, body) = send(method).await;
        assert_eq!(status, 403, "{method}: {body}");
        assert!(
            body.contains("API_KEY_SCOPE_INSUFFICIENT"),
            "{method}: {body}"
        );
    }
    assert_eq!(send("get").await.0, 200);
}

/// RFC 9112 §3.2: two `Host` lines, an invalid one, or none in HTTP/1.1 get a 400; routing by
/// host must not guess which host the upstream will read.
#[tokio::test(flavor = "multi_thread")]
async fn a_request_with_two_hosts_a_bad_one_or_none_gets_400() {
    let e = env().await;
    for head in [
        "GET /public/x HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n",
        "GET /public/x HTTP/1.1\r\nHost: a.example..\r\n",
        "GET /public/x HTTP/1.1\r\nHost: bad host\r\n",
        "GET /public/x HTTP/1.1\r\n",
        "GET http://a.example/public/x HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n",
    ] {
        let (status, body) = raw_request(e.gw.addr, head.into()).await;
        assert_eq!(status, 400, "{head}: {body}");
        assert!(body.contains("HOST_INVALID"), "{head}: {body}");
    }
    for head in [
        "GET /public/x HTTP/1.0\r\n",
        "GET /public/x HTTP/1.1\r\nHost: a.example.\r\n",
        "GET /public/x HTTP/1.1\r\nHost: [::1]:8080\r\n",
    ] {
        let (status, body) = raw_request(e.gw.addr, head.into()).await;
        assert_eq!(status, 200, "{head}: {body}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_cannot_remove_identity_headers_or_upgrade_to_h2c() {
    let e = env_with("").await;
    let (key, record) = create_key(&e.store, |_| {}).await;
    // `Connection` names the headers keygate adds: they still reach the upstream.
    let (status, body) = raw_request(
        e.gw.addr,
        format!(
            "GET /api/x HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {key}\r\n\
             Connection: keep-alive, X-Keygate-Team-Id, X-Keygate-Key-Id, X-Keygate-Scopes, \
             X-Keygate-Key-Type, X-Forwarded-For, X-Request-Id\r\n"
        ),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let seen: Value = serde_json::from_str(&body).unwrap();
    let h = &seen["headers"];
    assert_eq!(h["x-keygate-key-id"][0], record.api_key_id.as_str(), "{h}");
    assert_eq!(h["x-keygate-team-id"][0], "team1", "{h}");
    assert_eq!(h["x-keygate-key-type"][0], "shared", "{h}");
    assert!(h["x-keygate-scopes"].is_array(), "{h}");
    assert_eq!(h["x-forwarded-for"][0], "127.0.0.1", "{h}");
    assert!(h["x-request-id"].is_array(), "{h}");

    // An h2c upgrade goes on as a plain request: no 101, no Upgrade upstream. And from an
    // untrusted peer, `Forwarded` and `X-Real-IP` claims are dropped.
    let (status, body) = raw_request(
        e.gw.addr,
        format!(
            "GET /api/x HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {key}\r\n\
             Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n\
             HTTP2-Settings: AAMAAABkAAQAAP__\r\nForwarded: for=10.0.0.1\r\n\
             X-Real-IP: 10.0.0.1\r\n"
        ),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let seen: Value = serde_json::from_str(&body).unwrap();
    let h = &seen["headers"];
    for gone in ["upgrade", "http2-settings", "forwarded", "x-real-ip"] {
        assert!(h.get(gone).is_none(), "{gone} forwarded: {h}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_sent_twice_reaches_the_upstream_in_neither_place() {
    let e = env().await;
    let (key, _) = create_key(&e.store, |_| {}).await;
    // The /q route reads the query, then the bearer token: the query wins, both go.
    let r = client()
        .get(e.gw.url(&format!("/q/x?api_key={key}&a=1")))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen: Value = r.json().await.unwrap();
    assert_eq!(seen["query"], "a=1");
    assert!(!seen.to_string().contains(&key), "key forwarded: {seen}");
    // A header source the route does not read is not a credential here: left alone, and an
    // Authorization of another scheme is the upstream's.
    let r = client()
        .get(e.gw.url(&format!("/q/x?api_key={key}")))
        .header("authorization", "Basic dTpw")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen: Value = r.json().await.unwrap();
    assert_eq!(seen["headers"]["authorization"][0], "Basic dTpw");
}

#[tokio::test(flavor = "multi_thread")]
async fn header_and_query_sources_are_stripped_unless_kept() {
    let e = env().await;
    let (key, _) = create_key(&e.store, |_| {}).await;
    let r = client()
        .get(e.gw.url("/api/x"))
        .header("x-api-key", &key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen: Value = r.json().await.unwrap();
    assert!(seen["headers"].get("x-api-key").is_none());

    let r = client()
        .get(e.gw.url(&format!("/q/x?a=1&api_key={key}&b=2")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen: Value = r.json().await.unwrap();
    assert_eq!(seen["query"], "a=1&b=2");

    // Query is not a source on the default routes.
    let r = client()
        .get(e.gw.url(&format!("/api/x?api_key={key}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    let r = client()
        .get(e.gw.url("/keep/x"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen: Value = r.json().await.unwrap();
    assert_eq!(seen["headers"]["authorization"][0], format!("Bearer {key}"));
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_base_path_is_prepended() {
    let e = env().await;
    let (key, _) = create_key(&e.store, |_| {}).await;
    let r = client()
        .get(e.gw.url("/based/v1?z=9"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    let seen: Value = r.json().await.unwrap();
    assert_eq!(seen["path"], "/base/based/v1");
    assert_eq!(seen["query"], "z=9");
    // The upstream's own authority, not the gateway's that the client sent.
    assert_eq!(seen["headers"]["host"][0], e.echo.as_str());
    assert_eq!(seen["headers"]["host"].as_array().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_malformed_and_unknown_keys_get_401_with_bearer_challenge() {
    let e = env().await;
    let r = client().get(e.gw.url("/api/x")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(www_auth(&r), "Bearer realm=\"keygate\"");
    assert_eq!(r.headers()["content-type"], "application/json");
    assert_eq!(error_code(r).await, "API_KEY_MISSING");

    let r = client()
        .get(e.gw.url("/api/x"))
        .bearer_auth("kg_notavalidkey")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        www_auth(&r),
        "Bearer realm=\"keygate\", error=\"invalid_token\""
    );
    assert_eq!(error_code(r).await, "API_KEY_MALFORMED");

    // Well-formed (checksum correct) but never issued.
    let unknown = keygate::auth::key::NewKey::generate(
        &Default::default(),
        keygate::auth::key::SlotTag::random(),
    );
    let r = client()
        .get(e.gw.url("/api/x"))
        .bearer_auth(unknown.expose())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        www_auth(&r),
        "Bearer realm=\"keygate\", error=\"invalid_token\""
    );
    let body = r.text().await.unwrap();
    assert!(body.contains("API_KEY_INVALID"), "{body}");
    assert!(!body.contains(unknown.expose()), "key echoed in error");

    let r = client()
        .get(e.gw.url("/api/x"))
        .header("authorization", "Bearer a")
        .header("authorization", "Bearer b")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(error_code(r).await, "API_KEY_AMBIGUOUS");
}

#[tokio::test(flavor = "multi_thread")]
async fn disabled_and_expired_keys_are_refused_like_unknown_ones() {
    let e = env().await;
    let (disabled, _) = create_key(&e.store, |r| r.is_enabled = false).await;
    let r = client()
        .get(e.gw.url("/api/x"))
        .bearer_auth(&disabled)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(www_auth(&r).contains("invalid_token"));
    assert_eq!(error_code(r).await, "API_KEY_INVALID");

    let (expiring, _) = create_key(&e.store, |r| {
        r.expires_time = Some(chrono::Utc::now() + chrono::Duration::milliseconds(600));
    })
    .await;
    let ok = client()
        .get(e.gw.url("/api/x"))
        .bearer_auth(&expiring)
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    // Expiry is checked on every request, even from the cache.
    assert!(
        eventually(Duration::from_secs(3), || async {
            client()
                .get(e.gw.url("/api/x"))
                .bearer_auth(&expiring)
                .send()
                .await
                .unwrap()
                .status()
                == 401
        })
        .await
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn scopes_are_enforced_per_route_and_method() {
    let e = env().await;
    let (reader, _) = create_key(&e.store, |r| r.scope_names = vec!["read".into()]).await;
    let (writer, _) = create_key(&e.store, |r| r.scope_names = vec!["write".into()]).await;
    let c = client();
    assert_eq!(
        c.get(e.gw.url("/api/x"))
            .bearer_auth(&reader)
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let r = c
        .post(e.gw.url("/api/x"))
        .bearer_auth(&reader)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(
        www_auth(&r),
        "Bearer realm=\"keygate\", error=\"insufficient_scope\", scope=\"write\""
    );
    assert_eq!(error_code(r).await, "API_KEY_SCOPE_INSUFFICIENT");
    assert_eq!(
        c.post(e.gw.url("/api/x"))
            .bearer_auth(&writer)
            .body("hello")
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        c.get(e.gw.url("/admin"))
            .bearer_auth(&writer)
            .send()
            .await
            .unwrap()
            .status(),
        403
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn public_route_needs_no_key_but_still_drops_spoofed_identity() {
    let e = env().await;
    let r = client()
        .get(e.gw.url("/public/status"))
        .header("x-keygate-key-id", "apk_forged")
        .header("X-Keygate-Team-Id", "admins")
        // CGI, WSGI, Rack and PHP read `_` as `-`: these would be `HTTP_X_KEYGATE_*` there.
        .header("X_Keygate_Scopes", "admin")
        .header("X_Keygate_User_Id", "u_admin")
        .header("X_Forwarded_For", "6.6.6.6")
        .header("X_Real_IP", "6.6.6.6")
        // Paths and addresses some frameworks believe over the request's own.
        .header("X-Original-URL", "/admin/secret")
        .header("X-Rewrite-URL", "/admin/secret")
        .header("True-Client-IP", "6.6.6.6")
        .header("Client-IP", "6.6.6.6")
        .header("X-Forwarded-Port", "1")
        .header("X-Forwarded-Prefix", "/admin")
        .header("x_custom_field", "kept")
        .header("authorization", "Basic dXNlcjpwdw==")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen: Value = r.json().await.unwrap();
    let h = seen["headers"].as_object().unwrap();
    assert!(h.keys().all(|k| !k.starts_with("x-keygate-")), "{h:?}");
    for gone in [
        "x_keygate_scopes",
        "x_keygate_user_id",
        "x_forwarded_for",
        "x_real_ip",
        "x-original-url",
        "x-rewrite-url",
    ] {
        assert!(h.get(gone).is_none(), "{gone} forwarded: {h:?}");
    }
    assert_eq!(h["x_custom_field"][0], "kept", "{h:?}");
    // This environment trusts 127.0.0.1 as a proxy: its address claims pass (the untrusted
    // case: forwarded_for_from_an_untrusted_peer_is_ignored).
    for kept in [
        "true-client-ip",
        "client-ip",
        "x-forwarded-port",
        "x-forwarded-prefix",
    ] {
        assert!(h.get(kept).is_some(), "{kept} dropped: {h:?}");
    }
    // The upstream's own credential passes (README: public routes).
    assert_eq!(h["authorization"][0], "Basic dXNlcjpwdw==", "{h:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_method_override_passes_only_within_its_own_route() {
    let e = env().await;
    let (reader, _) = create_key(&e.store, |r| r.scope_names = vec!["read".into()]).await;
    let (writer, _) = create_key(&e.store, |r| r.scope_names = vec!["write".into()]).await;
    let send = |method: reqwest::Method, key: &str, header: &'static str, value: &'static str| {
        client()
            .request(method, e.gw.url("/api/items/1"))
            .bearer_auth(key)
            .header(header, value)
            .send()
    };
    // A GET the "api" route lets through would be a DELETE, which "writes" governs.
    for header in [
        "X-HTTP-Method-Override",
        "X-HTTP-Method",
        "X-Method-Override",
    ] {
        let r = send(reqwest::Method::GET, &reader, header, "delete")
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{header}");
        assert!(
            r.text()
                .await
                .unwrap()
                .contains("METHOD_OVERRIDE_NOT_ALLOWED")
        );
    }
    let r = send(
        reqwest::Method::GET,
        &reader,
        "X-HTTP-Method-Override",
        "not a method",
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 400);
    // Within one route the override changes nothing keygate checks, and it is forwarded.
    let r = send(
        reqwest::Method::GET,
        &reader,
        "X-HTTP-Method-Override",
        "PATCH",
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    let seen: Value = r.json().await.unwrap();
    assert_eq!(seen["headers"]["x-http-method-override"][0], "PATCH");
    let r = send(
        reqwest::Method::POST,
        &writer,
        "X-HTTP-Method-Override",
        "DELETE",
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    // The query's `_method` (Symfony, Laravel, Express's method-override), encoded or not.
    for query in [
        "_method=DELETE",
        "a=1&_method=delete",
        "%5Fmethod=DELETE",
        "_%6Dethod=DELETE",
    ] {
        let r = client()
            .get(e.gw.url(&format!("/api/items/1?{query}")))
            .bearer_auth(&reader)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{query}");
    }
    let r = client()
        .get(e.gw.url("/api/items/1?_method=GET&q=%20x"))
        .bearer_auth(&reader)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn allow_ips_ipv4_and_ipv6_through_a_trusted_proxy() {
    let e = env().await;
    let (v4, _) = create_key(&e.store, |r| {
        r.allow_ips = vec!["198.51.100.0/24".parse().unwrap()]
    })
    .await;
    let (v6, _) = create_key(&e.store, |r| {
        r.allow_ips = vec!["2001:db8::/32".parse().unwrap()]
    })
    .await;
    let status = |key: String, xff: &'static str| {
        let url = e.gw.url("/api/x");
        async move {
            client()
                .get(url)
                .bearer_auth(key)
                .header("x-forwarded-for", xff)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(status(v4.clone(), "198.51.100.7").await, 200);
    assert_eq!(status(v4.clone(), "203.0.113.7").await, 403);
    assert_eq!(status(v6.clone(), "2001:db8::42").await, 200);
    assert_eq!(status(v6.clone(), "2001:db9::1").await, 403);
    // The rightmost untrusted hop counts, not what the client wrote further left.
    assert_eq!(status(v4.clone(), "198.51.100.7, 203.0.113.7").await, 403);
    let r = client()
        .get(e.gw.url("/api/x"))
        .bearer_auth(&v4)
        .header("x-forwarded-for", "203.0.113.7")
        .send()
        .await
        .unwrap();
    assert!(www_auth(&r).contains("insufficient_scope"));
    assert_eq!(error_code(r).await, "API_KEY_IP_NOT_ALLOWED");
}

#[tokio::test(flavor = "multi_thread")]
async fn forwarded_for_from_an_untrusted_peer_is_ignored() {
    let e = env_with("trusted_proxies = []").await;
    let (key, _) = create_key(&e.store, |r| {
        r.allow_ips = vec!["198.51.100.0/24".parse().unwrap()]
    })
    .await;
    let r = client()
        .get(e.gw.url("/api/x"))
        .bearer_auth(&key)
        .header("x-forwarded-for", "198.51.100.7")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let (open, _) = create_key(&e.store, |_| {}).await;
    let claims = [
        "true-client-ip",
        "client-ip",
        "x-client-ip",
        "cf-connecting-ip",
        "x-forwarded-port",
        "x-forwarded-prefix",
        "x-forwarded-ssl",
    ];
    let mut request = client()
        .get(e.gw.url("/api/x"))
        .bearer_auth(&open)
        .header("x-forwarded-for", "198.51.100.7");
    for name in claims {
        request = request.header(name, "198.51.100.7");
    }
    let r = request.send().await.unwrap();
    let seen: Value = r.json().await.unwrap();
    // The spoofed chain is replaced by the real peer, and the other claims are gone.
    assert_eq!(seen["headers"]["x-forwarded-for"][0], "127.0.0.1");
    for gone in claims {
        assert!(seen["headers"].get(gone).is_none(), "{gone}: {seen}");
    }
}

/// Behind a trusted proxy that appends the client's address, bytes the client wrote itself
/// (not ASCII, not an address) cost only its own hops: the address the proxy appended is the
/// client's, for the listener's lists and for the upstream's `X-Forwarded-For`.
#[tokio::test(flavor = "multi_thread")]
async fn a_forwarded_hop_the_client_garbled_does_not_make_it_the_proxy() {
    let e = env_with("trusted_proxies = [\"127.0.0.1/32\"]\ndeny_ips = [\"203.0.113.0/24\"]").await;
    for claims in [
        &b"X-Forwarded-For: \xff, 203.0.113.5\r\n"[..],
        b"X-Forwarded-For: \xff\r\nX-Forwarded-For: 203.0.113.5\r\n",
        b"Forwarded: for=\xff, for=203.0.113.5\r\n",
    ] {
        let mut request = b"GET /public/x HTTP/1.1\r\nHost: t\r\nConnection: close\r\n".to_vec();
        request.extend_from_slice(claims);
        request.extend_from_slice(b"\r\n");
        let (status_line, body) = raw_exchange(e.gw.addr, &request).await;
        assert!(status_line.contains(" 403 "), "{status_line}: {body}");
        assert!(body.contains("CLIENT_IP_DENIED"), "{body}");
    }
    let mut request = b"GET /public/x HTTP/1.1\r\nHost: t\r\nConnection: close\r\n".to_vec();
    request.extend_from_slice(b"X-Forwarded-For: \xff\r\nX-Forwarded-For: 198.51.100.7\r\n\r\n");
    let (status_line, body) = raw_exchange(e.gw.addr, &request).await;
    assert!(status_line.contains(" 200 "), "{status_line}: {body}");
    assert!(
        body.contains("198.51.100.7, 127.0.0.1"),
        "the upstream lost the client's hop: {body}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn listener_deny_and_allow_lists() {
    let e = env_with("deny_ips = [\"127.0.0.0/8\"]").await;
    let r = client().get(e.gw.url("/public/x")).send().await.unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(error_code(r).await, "CLIENT_IP_DENIED");
    let e = env_with("allow_ips = [\"10.0.0.0/8\"]").await;
    assert_eq!(
        client()
            .get(e.gw.url("/public/x"))
            .send()
            .await
            .unwrap()
            .status(),
        403
    );
    let e = env_with("allow_ips = [\"127.0.0.1\"]").await;
    assert_eq!(
        client()
            .get(e.gw.url("/public/x"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn unreachable_upstream_is_502_and_slow_one_504() {
    let e = env().await;
    let (key, _) = create_key(&e.store, |_| {}).await;
    let r = client()
        .get(e.gw.url("/down"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    assert_eq!(error_code(r).await, "UPSTREAM_UNAVAILABLE");
    let r = client()
        .get(e.gw.url("/slow"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 504);
    assert_eq!(error_code(r).await, "UPSTREAM_TIMEOUT");
}

#[tokio::test(flavor = "multi_thread")]
async fn no_route_is_404() {
    let e = env().await;
    let r = client()
        .get(e.gw.url("/nothing-here"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "ROUTE_NOT_FOUND");
}

#[tokio::test(flavor = "multi_thread")]
async fn bodies_stream_through_byte_exact() {
    let e = env().await;
    let (key, _) = create_key(&e.store, |r| r.scope_names = vec!["write".into()]).await;
    let body: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let expected = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&body))
    };
    let r = client()
        .post(e.gw.url("/api/upload"))
        .bearer_auth(&key)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen: Value = r.json().await.unwrap();
    assert_eq!(seen["body_len"], 3_000_000);
    assert_eq!(seen["body_sha256"], expected.as_str());
}

#[tokio::test(flavor = "multi_thread")]
async fn http2_cleartext_clients_are_served() {
    let e = env().await;
    let (key, _) = create_key(&e.store, |_| {}).await;
    let h2 = h2_client();
    let r = h2
        .get(e.gw.url("/api/x"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.status(), 200);
    let seen: Value = r.json().await.unwrap();
    // Upstream is spoken to in HTTP/1.1 with the Host of the upstream.
    assert_eq!(seen["version"], "HTTP/1.1");
}

/// Review: `X-Forwarded-Host` lost the client's port (it carried the name routing uses). The
/// upstream gets the `Host` the client sent, port and case included, and HTTP/2's
/// `:authority`; a trusted proxy's own is kept.
#[tokio::test(flavor = "multi_thread")]
async fn x_forwarded_host_is_the_host_the_client_sent_port_included() {
    // 127.0.0.1 is not trusted here: the client's own X-Forwarded-Host is replaced.
    let e = env_with("").await;
    let seen = |r: reqwest::Response| async move {
        assert_eq!(r.status(), 200);
        let seen: Value = r.json().await.unwrap();
        seen["headers"]["x-forwarded-host"].clone()
    };
    let (status, body) = raw_request(
        e.gw.addr,
        "GET /public/x HTTP/1.1\r\nHost: API.example.com:8443\r\nX-Forwarded-Host: evil.example\r\n"
            .to_owned(),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        body["headers"]["x-forwarded-host"][0],
        "API.example.com:8443"
    );
    assert_eq!(
        body["headers"]["x-forwarded-host"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let addr = e.gw.addr.to_string();
    let h2 = h2_client().get(e.gw.url("/public/x")).send().await.unwrap();
    assert_eq!(h2.version(), reqwest::Version::HTTP_2);
    assert_eq!(
        seen(h2).await[0],
        addr.as_str(),
        ":authority, port included"
    );
    // A trusted proxy's X-Forwarded-Host is what its client sent: kept.
    let e = env().await;
    let r = client()
        .get(e.gw.url("/public/x"))
        .header("x-forwarded-host", "public.example:8443")
        .send()
        .await
        .unwrap();
    assert_eq!(seen(r).await[0], "public.example:8443");
}

/// `max_headers` (default 100) holds over HTTP/2 too, where hyper bounds only the header
/// list's bytes: 150 small fields got through to the upstream before.
#[tokio::test(flavor = "multi_thread")]
async fn max_headers_holds_over_http2() {
    let e = env().await;
    let (mut sender, _conn) = h2_connection(e.gw.addr).await;
    for (count, want) in [(90, 200), (150, 431)] {
        let mut req = h2_get(e.gw.addr, "/public/x");
        for i in 0..count {
            req.headers_mut().insert(
                http::HeaderName::from_bytes(format!("x-h{i}").as_bytes()).unwrap(),
                "v".parse().unwrap(),
            );
        }
        let r = sender.send_request(req).await.unwrap();
        assert_eq!(r.status(), want, "{count} fields");
        if want == 431 {
            let body = http_body_util::BodyExt::collect(r.into_body())
                .await
                .unwrap();
            let v: Value = serde_json::from_slice(&body.to_bytes()).unwrap();
            assert_eq!(v["error"]["code"], "REQUEST_HEADERS_TOO_MANY");
        }
    }
}

/// RFC 9113 §8.2.3: cookies an HTTP/2 client sends as fields of their own reach an HTTP/1.1
/// upstream as one `Cookie` line.
#[tokio::test(flavor = "multi_thread")]
async fn an_http2_clients_split_cookies_reach_the_upstream_as_one_line() {
    let e = env().await;
    let (mut sender, _conn) = h2_connection(e.gw.addr).await;
    let mut req = h2_get(e.gw.addr, "/public/x");
    req.headers_mut().append("cookie", "a=1".parse().unwrap());
    req.headers_mut().append("cookie", "b=2".parse().unwrap());
    let r = sender.send_request(req).await.unwrap();
    assert_eq!(r.status(), 200);
    let body = http_body_util::BodyExt::collect(r.into_body())
        .await
        .unwrap();
    let seen: Value = serde_json::from_slice(&body.to_bytes()).unwrap();
    assert_eq!(seen["version"], "HTTP/1.1");
    assert_eq!(seen["headers"]["cookie"], serde_json::json!(["a=1; b=2"]));
}

#[tokio::test(flavor = "multi_thread")]
async fn changes_from_another_process_reach_the_gateway_cache() {
    let e = env().await;
    let (key, record) = create_key(&e.store, |_| {}).await;
    let get = || async {
        client()
            .get(e.gw.url("/api/x"))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(get().await, 200);
    // The test process is "another process" writing to the same embedded file.
    service(&e.store)
        .set_enabled(&record.api_key_id, false, &cli(), chrono::Utc::now())
        .await
        .unwrap();
    assert!(eventually(Duration::from_secs(2), || async { get().await == 401 }).await);
    service(&e.store)
        .set_enabled(&record.api_key_id, true, &cli(), chrono::Utc::now())
        .await
        .unwrap();
    assert!(eventually(Duration::from_secs(2), || async { get().await == 200 }).await);
    service(&e.store)
        .revoke(&record.api_key_id, &cli(), chrono::Utc::now())
        .await
        .unwrap();
    assert!(eventually(Duration::from_secs(2), || async { get().await == 401 }).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn rotation_keeps_the_old_key_for_the_grace_period_only() {
    let e = env().await;
    let (old, record) = create_key(&e.store, |_| {}).await;
    let status = |key: String| {
        let url = e.gw.url("/api/x");
        async move {
            client()
                .get(url)
                .bearer_auth(key)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(status(old.clone()).await, 200);
    let (new, _) = service(&e.store)
        .rotate(
            &record.api_key_id,
            Duration::from_secs(1),
            None,
            &cli(),
            chrono::Utc::now(),
        )
        .await
        .unwrap();
    let new = new.expose().to_owned();
    assert_eq!(status(new.clone()).await, 200);
    assert_eq!(status(old.clone()).await, 200);
    assert!(
        eventually(Duration::from_secs(4), || status(old.clone())
            .then_some_401())
        .await
    );
    assert_eq!(status(new).await, 200);
}

trait Is401 {
    fn then_some_401(self) -> impl std::future::Future<Output = bool>;
}

impl<F: std::future::Future<Output = u16>> Is401 for F {
    async fn then_some_401(self) -> bool {
        self.await == 401
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_lets_in_flight_requests_finish_then_exits_zero() {
    let mut e = env().await;
    let (key, _) = create_key(&e.store, |_| {}).await;
    // The slow route answers 504 after 300 ms: in flight while the signal arrives.
    let url = e.gw.url("/slow");
    let in_flight = tokio::spawn(async move {
        client()
            .get(url)
            .bearer_auth(key)
            .send()
            .await
            .map(|r| r.status().as_u16())
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let status = tokio::task::spawn_blocking(move || e.gw.terminate())
        .await
        .unwrap();
    assert!(status.success(), "exit status {status:?}");
    assert_eq!(in_flight.await.unwrap().unwrap(), 504);
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_under_load_loses_no_accepted_request() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("keys.db");
    let slow = upstream::delayed(Duration::from_millis(400)).await;
    let store: Arc<dyn KeyStore> = Arc::new(EmbeddedStore::open(&db).unwrap());
    let mut gw = Gateway::start(&format!(
        "[store]\nkind = \"embedded\"\npath = \"{}\"\n[upstreams.slow]\nurl = \"http://{slow}\"\n\
         [[routes]]\npath_prefix = \"/\"\nupstream = \"slow\"\n",
        db.display()
    ));
    let (key, _) = create_key(&store, |_| {}).await;
    // 64 requests in flight on their own connections when the signal arrives.
    let mut in_flight = Vec::new();
    for _ in 0..64 {
        let url = gw.url("/work");
        let key = key.clone();
        in_flight.push(tokio::spawn(async move {
            let c = reqwest::Client::builder()
                .no_proxy()
                .pool_max_idle_per_host(0)
                .build()
                .unwrap();
            let r = c.get(url).bearer_auth(key).send().await?;
            let status = r.status().as_u16();
            let body = r.text().await?;
            Ok::<_, reqwest::Error>((status, body))
        }));
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    let addr = gw.addr;
    let exit = tokio::task::spawn_blocking(move || gw.terminate());
    let mut done = 0;
    for t in in_flight {
        let (status, body) = t.await.unwrap().expect("an accepted request was lost");
        assert_eq!((status, body.as_str()), (200, "done"));
        done += 1;
    }
    assert_eq!(done, 64);
    assert!(exit.await.unwrap().success());
    // After the drain the listener is gone.
    assert!(std::net::TcpStream::connect(addr).is_err());
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_or_too_many_headers_get_431() {
    let e = env_with("max_header_bytes = 16384\nmax_headers = 20").await;
    let (key, _) = create_key(&e.store, |_| {}).await;
    let r = client()
        .get(e.gw.url("/api/x"))
        .bearer_auth(&key)
        .header("x-big", "a".repeat(20_000))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 431);
    let mut req = client().get(e.gw.url("/api/x")).bearer_auth(&key);
    for i in 0..30 {
        req = req.header(format!("x-h{i}"), "v");
    }
    assert_eq!(req.send().await.unwrap().status(), 431);
    // Within the limits, all is well.
    let r = client()
        .get(e.gw.url("/api/x"))
        .bearer_auth(&key)
        .header("x-big", "a".repeat(8_000))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn by_default_a_head_of_up_to_32_kib_is_accepted() {
    let e = env().await;
    let (key, _) = create_key(&e.store, |_| {}).await;
    let with_header = |len: usize| {
        client()
            .get(e.gw.url("/api/x"))
            .bearer_auth(&key)
            .header("x-big", "a".repeat(len))
            .send()
    };
    assert_eq!(with_header(30_000).await.unwrap().status(), 200);
    assert_eq!(with_header(34_000).await.unwrap().status(), 431);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_head_limit_is_exact_however_the_head_arrives() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let e = env().await;
    let (key, _) = create_key(&e.store, |_| {}).await;
    // A request head of exactly `len` bytes (32 KiB: the default limit), sent in `piece`-byte
    // writes; the status the gateway answers.
    let status = |len: usize, piece: usize| {
        let key = key.clone();
        async move {
            let start = format!(
                "GET /api/x HTTP/1.1\r\nhost: x\r\nconnection: close\r\nauthorization: Bearer {key}\r\nx-big: "
            );
            let pad = len - start.len() - "\r\n\r\n".len();
            let head = format!("{start}{}\r\n\r\n", "a".repeat(pad));
            assert_eq!(head.len(), len);
            let mut conn = tokio::net::TcpStream::connect(e.gw.addr).await.unwrap();
            conn.set_nodelay(true).unwrap();
            for chunk in head.as_bytes().chunks(piece) {
                conn.write_all(chunk).await.unwrap();
                if piece < len {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
            let mut answer = [0u8; 12];
            conn.read_exact(&mut answer).await.unwrap();
            String::from_utf8_lossy(&answer[9..12]).into_owned()
        }
    };
    for piece in [32 * 1024 + 1, 1000] {
        assert_eq!(
            status(32 * 1024, piece).await,
            "200",
            "in {piece}-byte writes"
        );
        assert_eq!(
            status(32 * 1024 + 1, piece).await,
            "431",
            "in {piece}-byte writes"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_that_never_send_a_request_give_their_slot_back() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let e = env_with("max_connections = 2\nheader_read_timeout = \"300ms\"").await;
    // One says nothing, one only the HTTP/2 preface: both slots taken.
    let silent = tokio::net::TcpStream::connect(e.gw.addr).await.unwrap();
    let mut preface = tokio::net::TcpStream::connect(e.gw.addr).await.unwrap();
    preface
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    for mut conn in [silent, preface] {
        // Closed by the gateway (end of stream, perhaps after its HTTP/2 SETTINGS frame).
        let closed = tokio::time::timeout(Duration::from_secs(5), async {
            let mut buf = [0u8; 256];
            loop {
                match conn.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "a connection without a request stayed open");
    }
    let r = client().get(e.gw.url("/public/x")).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_never_finishes_its_headers_is_cut_off() {
    use std::io::{Read, Write};
    let e = env_with("header_read_timeout = \"300ms\"").await;
    let mut s = std::net::TcpStream::connect(e.gw.addr).unwrap();
    s.write_all(b"GET /api/x HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let started = std::time::Instant::now();
    let mut buf = Vec::new();
    // The gateway closes the connection (with or without a 408) well before our 5 s.
    let _ = s.read_to_end(&mut buf);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "slow headers were not cut off"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn route_body_limit_refuses_larger_bodies_with_413() {
    let e = env().await;
    let (key, _) = create_key(&e.store, |_| {}).await;
    let post = |body: reqwest::Body| {
        let url = e.gw.url("/limited/upload");
        let key = key.clone();
        async move {
            client()
                .post(url)
                .bearer_auth(key)
                .body(body)
                .send()
                .await
                .unwrap()
        }
    };
    let r = post(vec![1u8; 1000].into()).await;
    assert_eq!(r.status(), 200);
    let r = post(vec![1u8; 1001].into()).await;
    assert_eq!(r.status(), 413);
    assert_eq!(error_code(r).await, "BODY_TOO_LARGE");
    // Chunked: no length up front, the limit is enforced while streaming.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        (0..10).map(|_| Ok(vec![2u8; 300])).collect();
    let r = post(reqwest::Body::wrap_stream(futures_util::stream::iter(
        chunks,
    )))
    .await;
    assert_eq!(r.status(), 413);
    let small: Vec<Result<Vec<u8>, std::io::Error>> = (0..3).map(|_| Ok(vec![2u8; 300])).collect();
    let r = post(reqwest::Body::wrap_stream(futures_util::stream::iter(
        small,
    )))
    .await;
    assert_eq!(r.status(), 200);
    let seen: Value = r.json().await.unwrap();
    assert_eq!(seen["body_len"], 900);
}

#[tokio::test(flavor = "multi_thread")]
async fn connect_is_refused_not_tunnelled() {
    use std::io::{Read, Write};
    let e = env().await;
    let mut s = std::net::TcpStream::connect(e.gw.addr).unwrap();
    let target = e.echo.as_str();
    s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 4096];
    let n = s.read(&mut buf).unwrap();
    let answer = String::from_utf8_lossy(&buf[..n]);
    assert!(answer.starts_with("HTTP/1.1 501"), "{answer}");
    assert!(answer.contains("METHOD_NOT_SUPPORTED"), "{answer}");
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_keep_alive_connections_are_closed_after_the_header_timeout() {
    use std::io::{Read, Write};
    let e = env_with("header_read_timeout = \"400ms\"").await;
    let mut s = std::net::TcpStream::connect(e.gw.addr).unwrap();
    s.write_all(b"GET /public/x HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 4096];
    let n = s.read(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    // Now idle on a keep-alive connection: the gateway closes it after the timeout.
    let started = std::time::Instant::now();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "idle connection kept open"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn access_log_has_one_line_per_request_and_never_a_key() {
    let logs = tempfile::tempdir().unwrap();
    let log = logs.path().join("keygate.log");
    let mut e = env_started("", |config| Gateway::start_logging_to(config, &log)).await;
    let (key, record) = create_key(&e.store, |_| {}).await;
    let unknown = keygate::auth::key::NewKey::generate(
        &Default::default(),
        keygate::auth::key::SlotTag::random(),
    );
    let unknown = unknown.expose();
    let send = |id: &'static str, key: Option<&str>| {
        let mut req = client()
            .get(e.gw.url("/api/items"))
            .header("x-request-id", id);
        if let Some(key) = key {
            req = req.bearer_auth(key);
        }
        async move { req.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(send("log-valid", Some(&key)).await, 200);
    // Written while the gateway runs, not only when it stops.
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        eventually(Duration::from_secs(5), || async {
            read().contains("log-valid")
        })
        .await,
        "no access line while running: {}",
        read()
    );
    assert_eq!(send("log-unknown", Some(unknown)).await, 401);
    assert_eq!(send("log-missing", None).await, 401);
    let status = tokio::task::spawn_blocking(move || e.gw.terminate())
        .await
        .unwrap();
    assert!(status.success(), "exit status {status:?}");

    let text = read();
    let line = |id: &str| {
        let mut lines = text.lines().filter(|l| l.contains(id));
        let line = lines
            .next()
            .unwrap_or_else(|| panic!("no line for {id}: {text}"));
        assert!(lines.next().is_none(), "two lines for {id}: {text}");
        line.to_owned()
    };
    let valid = line("log-valid");
    assert!(valid.contains("keygate::access"), "{valid}");
    assert!(valid.contains("status=200"), "{valid}");
    assert!(valid.contains(record.api_key_id.as_str()), "{valid}");
    assert!(line("log-unknown").contains("status=401"));
    assert!(line("log-missing").contains("status=401"));
    assert!(!text.contains(&key), "a key in the log: {text}");
    assert!(
        !text.contains(unknown),
        "a presented key in the log: {text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_leaves_before_the_answer_is_counted_and_logged_once() {
    use tokio::io::AsyncWriteExt;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("keygate.log");
    let silent = upstream::silent().await;
    let gw = Gateway::start_logging_to(
        &format!(
            "[store]\nkind = \"embedded\"\npath = \"{}\"\n[upstreams.silent]\n\
             url = \"http://{silent}\"\nresponse_timeout = \"60s\"\n[[routes]]\n\
             name = \"hangs\"\npath_prefix = \"/\"\nupstream = \"silent\"\npublic = true\n",
            dir.path().join("keys.db").display()
        ),
        &log,
    );
    let metrics = || gw.metrics();
    let mut conn = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    conn.write_all(b"GET /wait HTTP/1.1\r\nHost: x\r\nX-Request-Id: left-early\r\n\r\n")
        .await
        .unwrap();
    let waiting = eventually(Duration::from_secs(5), || async {
        metrics().await.contains("\nkeygate_in_flight_requests 1\n")
    })
    .await;
    assert!(waiting, "the request never showed as in flight");
    drop(conn);

    // Out of the gauge, counted once as client_closed, and logged with nginx's 499.
    let closed = "keygate_requests_total{outcome=\"client_closed\",route=\"hangs\"} 1\n";
    let counted = eventually(Duration::from_secs(5), || async {
        let text = metrics().await;
        text.contains(closed) && text.contains("\nkeygate_in_flight_requests 0\n")
    })
    .await;
    assert!(counted, "{}", metrics().await);
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    let logged = eventually(Duration::from_secs(5), || async {
        read().contains("left-early")
    })
    .await;
    assert!(logged, "no access line: {}", read());
    let text = read();
    let lines: Vec<&str> = text.lines().filter(|l| l.contains("left-early")).collect();
    assert_eq!(lines.len(), 1, "{text}");
    assert!(lines[0].contains("status=499"), "{}", lines[0]);
    assert!(
        lines[0].contains("outcome=\"client_closed\""),
        "{}",
        lines[0]
    );
}

/// A gateway with one public route to `upstream`.
fn public_gateway(dir: &tempfile::TempDir, upstream: std::net::SocketAddr) -> Gateway {
    public_gateway_with(dir, upstream, "")
}

/// The same, with more settings for the upstream (`[upstreams.up]` lines).
fn public_gateway_with(
    dir: &tempfile::TempDir,
    upstream: std::net::SocketAddr,
    upstream_settings: &str,
) -> Gateway {
    Gateway::start(&format!(
        "[store]\nkind = \"embedded\"\npath = \"{}\"\n[upstreams.up]\nurl = \"http://{upstream}\"\n\
         {upstream_settings}\n[[routes]]\npath_prefix = \"/\"\nupstream = \"up\"\npublic = true\n",
        dir.path().join("keys.db").display()
    ))
}

/// Trailers cross keygate both ways over HTTP/1.1 (RFC 9110 §6.5): `Trailer` is end-to-end,
/// and hyper's HTTP/1.1 encoder writes only the trailer fields it declares.
#[tokio::test]
async fn trailers_reach_the_upstream_and_the_client_over_http1() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = listener.local_addr().unwrap();
    let (seen_tx, seen_rx) = tokio::sync::oneshot::channel::<Vec<u8>>();
    tokio::spawn(async move {
        let (mut conn, _) = listener.accept().await.unwrap();
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        // The request ends with its trailer section's empty line, after the last chunk.
        let ended = |seen: &[u8]| {
            let text = String::from_utf8_lossy(seen);
            text.split_once("\r\n0\r\n")
                .is_some_and(|(_, trailers)| trailers.ends_with("\r\n"))
                && text.ends_with("\r\n\r\n")
                && text.contains("x-sig: abc\r\n")
        };
        while !ended(&seen) {
            let n = conn.read(&mut buf).await.unwrap();
            assert!(n > 0, "{}", String::from_utf8_lossy(&seen));
            seen.extend_from_slice(&buf[..n]);
        }
        conn.write_all(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: x-sum\r\n\r\n\
              2\r\nok\r\n0\r\nx-sum: 42\r\n\r\n",
        )
        .await
        .unwrap();
        let _ = seen_tx.send(seen);
    });
    // The key header renamed: a trailer of that name is a credential too.
    let gw = Gateway::start(&format!(
        "[auth]\nheader_name = \"x-client-key\"\n[store]\nkind = \"embedded\"\npath = \"{}\"\n\
         [upstreams.up]\nurl = \"http://{up}\"\n\
         [[routes]]\npath_prefix = \"/\"\nupstream = \"up\"\npublic = true\n",
        dir.path().join("keys.db").display()
    ));
    // A trailer claiming an identity or carrying a key is dropped: upstreams may merge
    // trailers into headers.
    let request = b"POST /t HTTP/1.1\r\nHost: t\r\nTE: trailers\r\n\
        Trailer: x-keygate-key-id, x-client-key, x-sig\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
        5\r\nhello\r\n0\r\nx-keygate-key-id: forged\r\nx-client-key: k-forged\r\nx-sig: abc\r\n\r\n";
    let (status, body) = raw_exchange(gw.addr, request).await;
    assert!(status.contains(" 200 "), "{status}");
    assert!(
        body.contains("x-sum: 42"),
        "the client lost the trailer: {body:?}"
    );
    let seen = String::from_utf8(seen_rx.await.unwrap()).unwrap();
    assert!(
        seen.to_ascii_lowercase()
            .contains("trailer: x-keygate-key-id, x-client-key, x-sig"),
        "{seen}"
    );
    assert!(
        !seen.contains("forged"),
        "a trailer forged an identity or carried a key: {seen}"
    );
}

/// `te: trailers` reaches an HTTP/2 upstream (gRPC servers ask for it); any other `TE`, and
/// any `TE` towards HTTP/1.1, is a hop-by-hop header and goes.
#[tokio::test]
async fn te_trailers_reaches_an_http2_upstream_only() {
    let dir = tempfile::tempdir().unwrap();
    let echo = upstream::echo().await;
    let h2 = public_gateway_with(&dir, echo, "http2 = true");
    let dir1 = tempfile::tempdir().unwrap();
    let h1 = public_gateway_with(&dir1, echo, "");
    for (gw, te, want) in [
        (&h2, "trailers", Some("trailers")),
        (&h2, "gzip, trailers", Some("trailers")),
        (&h2, "gzip", None),
        (&h1, "trailers", None),
    ] {
        let r = client()
            .get(gw.url("/x"))
            .header("te", te)
            .send()
            .await
            .unwrap();
        let seen: Value = r.json().await.unwrap();
        assert_eq!(seen["headers"]["te"][0].as_str(), want, "{te}: {seen}");
    }
}

/// A transfer coding other than chunked is not undone by hyper: forwarded, its bytes would be
/// taken for the body itself, its coding header gone. A request with one gets 501 (RFC 9112
/// §6.1), a response with one 502.
#[tokio::test]
async fn a_transfer_coding_other_than_chunked_is_refused_both_ways() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let mut buf = [0u8; 4096];
            let _ = conn.read(&mut buf).await;
            let _ = conn
                .write_all(
                    b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
                )
                .await;
        }
    });
    let gw = public_gateway_with(&dir, up, "");
    let request = b"POST /t HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip, chunked\r\n\
        Connection: close\r\n\r\n3\r\nabc\r\n0\r\n\r\n";
    let (status, body) = raw_exchange(gw.addr, request).await;
    assert!(status.contains(" 501 "), "{status}: {body}");
    assert!(body.contains("TRANSFER_CODING_NOT_SUPPORTED"), "{body}");
    let (status, body) = raw_exchange(
        gw.addr,
        b"GET /t HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(status.contains(" 502 "), "{status}: {body}");
    assert!(body.contains("UPSTREAM_UNAVAILABLE"), "{body}");
}

/// An upstream that sends part of its response and then nothing, keeping the connection open:
/// the client gets what came, then the response is cut off once `body_idle_timeout` passes,
/// instead of holding both connections for as long as the upstream does.
#[tokio::test]
async fn a_response_body_that_stalls_is_cut_off_after_the_idle_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let never = Arc::new(tokio::sync::Notify::new());
    let up = upstream::chunked(&["event: first\n\n"], &["event: never\n\n"], never).await;
    let gw = public_gateway_with(&dir, up, "body_idle_timeout = \"500ms\"");
    // Before the request: the gateway's wait begins after this, however late the first chunk
    // reaches the client.
    let started = std::time::Instant::now();
    let mut r = client().get(gw.url("/events")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let first = r.chunk().await.unwrap().unwrap();
    assert_eq!(&first[..], b"event: first\n\n");
    let rest = tokio::time::timeout(Duration::from_secs(10), r.chunk())
        .await
        .expect("the stalled response was not cut off");
    assert!(rest.is_err(), "the response ended as if whole: {rest:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "cut off before the idle timeout: {:?}",
        started.elapsed()
    );
    assert_cut_off(&gw, "upstream_body_stalled").await;
}

/// The gateway's `keygate_cut_off_total` shows one cut-off for `reason`.
async fn assert_cut_off(gw: &Gateway, reason: &str) {
    let line = format!("\nkeygate_cut_off_total{{reason=\"{reason}\"}} 1\n");
    let counted = eventually(Duration::from_secs(2), || async {
        gw.metrics().await.contains(&line)
    })
    .await;
    assert!(counted, "no {line:?} in {}", gw.metrics().await);
}

/// A public route to `upstream` on a gateway whose `send_timeout` is 500 ms.
fn gateway_with_short_send_timeout(dir: &tempfile::TempDir, up: std::net::SocketAddr) -> Gateway {
    Gateway::start(&format!(
        "[proxy]\nsend_timeout = \"500ms\"\n[store]\nkind = \"embedded\"\npath = \"{}\"\n\
         [upstreams.up]\nurl = \"http://{up}\"\n\
         [[routes]]\npath_prefix = \"/\"\nupstream = \"up\"\npublic = true\n",
        dir.path().join("keys.db").display()
    ))
}

/// A client that asks for a large response and stops reading it: once a write to it has waited
/// `send_timeout`, the gateway closes the connection (the client finds the response cut short)
/// instead of holding it, and the upstream connection feeding it, for as long as the client
/// keeps the socket open.
#[tokio::test]
async fn a_client_that_stops_reading_is_cut_off_after_the_send_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const LEN: usize = 64 << 20;
    let dir = tempfile::tempdir().unwrap();
    let up = upstream::large(LEN).await;
    let gw = gateway_with_short_send_timeout(&dir, up);
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut conn = socket.connect(gw.addr).await.unwrap();
    conn.write_all(b"GET /large HTTP/1.1\r\nhost: test\r\n\r\n")
        .await
        .unwrap();
    // Reads nothing for six send timeouts...
    tokio::time::sleep(Duration::from_secs(3)).await;
    // ...then all there is: what the buffers held, and the end the gateway made.
    let mut got = 0;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match tokio::time::timeout(Duration::from_secs(10), conn.read(&mut buf))
            .await
            .expect("the connection was still open: the client was not cut off")
        {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    assert!(got < LEN, "the whole response arrived: {got} bytes");
    assert_cut_off(&gw, "client_not_reading").await;
}

/// The same over HTTP/2, where the client stops reading by withholding its flow-control window
/// (WINDOW_UPDATE) rather than its socket: the socket keeps taking frames, so no write waits,
/// and hyper stops asking for the response until the window opens. Once a stream's response
/// has waited `send_timeout` for window, the gateway closes the connection.
#[tokio::test]
async fn an_http2_client_that_withholds_its_window_is_cut_off_after_the_send_timeout() {
    const LEN: usize = 64 << 20;
    let dir = tempfile::tempdir().unwrap();
    let up = upstream::large(LEN).await;
    let gw = gateway_with_short_send_timeout(&dir, up);
    let client = h2_client();
    let response = client
        .get(format!("http://{}/large", gw.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    // Reads nothing for six send timeouts: the client's stack keeps reading the socket, but
    // the stream's window (2 MiB, reqwest's default) is spent and not given back...
    tokio::time::sleep(Duration::from_secs(3)).await;
    // ...then all there is.
    let body = tokio::time::timeout(Duration::from_secs(10), response.bytes())
        .await
        .expect("the stream was still open: the client was not cut off");
    assert!(
        body.as_ref().map_or(true, |b| b.len() < LEN),
        "the whole response arrived"
    );
    assert_cut_off(&gw, "client_not_reading").await;
}

/// Review: one stalled stream closed its whole connection at once, with no GOAWAY, cutting the
/// connection's healthy streams (a browser with a paused download lost every other request on
/// it). The connection now closes gracefully first: a request in flight on another stream is
/// answered in full, and only then, or a send timeout later, is the connection cut.
#[tokio::test]
async fn a_stalled_http2_stream_leaves_the_other_streams_of_its_connection_time_to_finish() {
    const LEN: usize = 64 << 20;
    let dir = tempfile::tempdir().unwrap();
    let release = Arc::new(tokio::sync::Notify::new());
    let up = upstream::large_and_held(LEN, release.clone()).await;
    let gw = gateway_with_short_send_timeout(&dir, up);
    let client = h2_client();
    // One connection: the held request is sent once the stalled one has its answer.
    let stalled = client
        .get(format!("http://{}/large", gw.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(stalled.version(), reqwest::Version::HTTP_2);
    let held = tokio::spawn(client.get(format!("http://{}/held", gw.addr)).send());
    // The stalled stream is found (its window spent, nothing read)...
    assert_cut_off(&gw, "client_not_reading").await;
    // ...and the held request, already in flight, is still answered in full.
    release.notify_one();
    let answered = tokio::time::timeout(Duration::from_secs(5), held)
        .await
        .expect("the held request was not answered")
        .unwrap()
        .expect("the held request failed: its stream was cut with the stalled one");
    assert_eq!(answered.status(), 200);
    assert_eq!(answered.text().await.unwrap(), "released");
    // The stalled stream, still not read a send timeout later, is cut all the same. (Read
    // sooner, it would have gone on: a stream that moves again may finish while the connection
    // closes.)
    tokio::time::sleep(Duration::from_secs(2)).await;
    let body = tokio::time::timeout(Duration::from_secs(10), stalled.bytes())
        .await
        .expect("the stalled stream was still open: the connection was never cut");
    assert!(
        body.as_ref().map_or(true, |b| b.len() < LEN),
        "the whole response arrived"
    );
}

/// A response of one small frame waits for window too: a client that grants none (its initial
/// stream window 0), or one byte (hyper hands h2 the last frame once the stream has any window
/// and drops the body), is cut off all the same, not left holding the stream and its
/// connection. The same for keygate's own answers: a client could otherwise hold a stream on
/// a 401, without a key, and with it the connection for good (a graceful close waits for the
/// streams in flight). Both listeners' answers are watched.
#[tokio::test]
async fn an_http2_client_that_grants_little_or_no_window_for_a_small_answer_is_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let up = upstream::echo().await;
    let gw = Gateway::start(&format!(
        "[proxy]\nsend_timeout = \"500ms\"\n[store]\nkind = \"embedded\"\npath = \"{}\"\n\
         [upstreams.up]\nurl = \"http://{up}\"\n\
         [[routes]]\npath_prefix = \"/public\"\nupstream = \"up\"\npublic = true\n\
         [[routes]]\npath_prefix = \"/\"\nupstream = \"up\"\n",
        dir.path().join("keys.db").display()
    ));
    let mut cut_off = 0;
    for window in [0, 1] {
        let client = reqwest::Client::builder()
            .no_proxy()
            .http2_prior_knowledge()
            .http2_initial_stream_window_size(window)
            .build()
            .unwrap();
        for (url, status) in [
            (format!("http://{}/public/small", gw.addr), 200),
            (format!("http://{}/private", gw.addr), 401),
            (gw.admin_url("/v1/keys"), 401),
        ] {
            let what = format!("{url} with an initial window of {window}");
            let response = client.get(&url).send().await.unwrap();
            assert_eq!(response.status(), status, "{what}");
            assert_eq!(response.version(), reqwest::Version::HTTP_2);
            // Nothing is read meanwhile: reading would take the body a byte at a time.
            cut_off += 1;
            let line =
                format!("\nkeygate_cut_off_total{{reason=\"client_not_reading\"}} {cut_off}\n");
            let counted = eventually(Duration::from_secs(3), || async {
                gw.metrics().await.contains(&line)
            })
            .await;
            assert!(counted, "{what}: the held answer was not cut off");
            // The connection closes gracefully first: read within one more send timeout, the
            // answer would still go out. Not read then, it is cut.
            tokio::time::sleep(Duration::from_millis(1500)).await;
            let body = tokio::time::timeout(Duration::from_secs(5), response.bytes()).await;
            assert!(matches!(body, Ok(Err(_))), "{what}: {body:?}");
        }
    }
}

/// The upload's side of the same stall: an HTTP/2 upstream that stops granting window for a
/// request body (it neither reads it nor answers) holds the upload before the socket fills, so
/// the write watch sees nothing. Once a stream's body has waited the upstream's
/// `body_idle_timeout` for window, the upstream connection is closed, and the client gets 502
/// instead of an upload that stands still for as long as the upstream keeps the connection.
#[tokio::test]
async fn an_http2_upstream_that_withholds_its_window_from_an_upload_is_let_go() {
    let dir = tempfile::tempdir().unwrap();
    let up = upstream::h2_never_reads().await;
    let gw = public_gateway_with(&dir, up, "http2 = true\nbody_idle_timeout = \"500ms\"");
    let answer = upload_until_let_go(&gw).await;
    assert!(
        answer.starts_with(b"HTTP/1.1 502"),
        "{:?}",
        String::from_utf8_lossy(&answer)
    );
    assert_cut_off(&gw, "upstream_not_reading").await;
}

/// An upload to an HTTP/2 upstream that reads it, with pauses of the client's shorter than the
/// upstream's `body_idle_timeout`, is not taken for one whose window is withheld.
#[tokio::test]
async fn an_upload_to_an_http2_upstream_that_reads_it_goes_through() {
    const CHUNKS: usize = 64;
    const CHUNK: usize = 256 << 10;
    let dir = tempfile::tempdir().unwrap();
    let up = upstream::echo().await;
    let gw = public_gateway_with(&dir, up, "http2 = true\nbody_idle_timeout = \"500ms\"");
    let chunks = futures_util::stream::unfold(0, |sent| async move {
        if sent == CHUNKS {
            return None;
        }
        if sent % 8 == 7 {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Some((
            Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b'x'; CHUNK])),
            sent + 1,
        ))
    });
    let r = client()
        .post(format!("http://{}/upload", gw.addr))
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let echoed: Value = r.json().await.unwrap();
    assert_eq!(echoed["version"], "HTTP/2.0");
    assert_eq!(echoed["body_len"], CHUNKS * CHUNK);
    assert!(
        gw.metrics()
            .await
            .contains("\nkeygate_cut_off_total{reason=\"upstream_not_reading\"} 0\n")
    );
}

/// What the HTTP/2 window watch must leave alone: a client that reads slowly but keeps reading
/// (pauses shorter than `send_timeout`, the window spent and given back many times over), and a
/// response that waits on its upstream longer than `send_timeout` (a long poll: the stream has
/// window, the body has nothing yet).
#[tokio::test]
async fn an_http2_client_that_reads_slowly_or_waits_on_its_upstream_is_not_cut_off() {
    const LEN: usize = 8 << 20;
    let dir = tempfile::tempdir().unwrap();
    let large = upstream::large(LEN).await;
    let release = Arc::new(tokio::sync::Notify::new());
    let events = upstream::chunked(&["first\n"], &["second\n"], release.clone()).await;
    let gw = Gateway::start(&format!(
        "[proxy]\nsend_timeout = \"500ms\"\n[store]\nkind = \"embedded\"\npath = \"{}\"\n\
         [upstreams.large]\nurl = \"http://{large}\"\n\
         [upstreams.events]\nurl = \"http://{events}\"\n\
         [[routes]]\npath_prefix = \"/large\"\nupstream = \"large\"\npublic = true\n\
         [[routes]]\npath_prefix = \"/events\"\nupstream = \"events\"\npublic = true\n",
        dir.path().join("keys.db").display()
    ));
    let client = h2_client();

    let mut slow = client
        .get(format!("http://{}/large", gw.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(slow.version(), reqwest::Version::HTTP_2);
    let (mut got, mut since_pause) = (0, 0);
    while let Some(chunk) = slow.chunk().await.unwrap() {
        got += chunk.len();
        since_pause += chunk.len();
        if since_pause >= 512 << 10 {
            since_pause = 0;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    assert_eq!(got, LEN);

    let mut waiting = client
        .get(format!("http://{}/events", gw.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(waiting.chunk().await.unwrap().unwrap(), "first\n");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    release.notify_one();
    assert_eq!(waiting.chunk().await.unwrap().unwrap(), "second\n");
    assert!(
        gw.metrics()
            .await
            .contains("\nkeygate_cut_off_total{reason=\"client_not_reading\"} 0\n")
    );
}

/// A client that reads steadily but slowly, granting window 8 KiB at a time: each grant lets
/// the stream move, so it is not cut off, however large the pieces the upstream's body comes in
/// (up to a few hundred KiB here, each taking longer than `send_timeout` to go out at this
/// pace).
#[tokio::test]
async fn an_http2_client_that_reads_steadily_but_slowly_is_not_cut_off() {
    const LEN: usize = 512 << 10;
    const BYTES_PER_SEC: u64 = 96 << 10;
    let dir = tempfile::tempdir().unwrap();
    let up = upstream::large(LEN).await;
    let gw = gateway_with_short_send_timeout(&dir, up);
    let client = reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .http2_initial_stream_window_size(16 << 10)
        .build()
        .unwrap();
    let mut slow = client
        .get(format!("http://{}/large", gw.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(slow.version(), reqwest::Version::HTTP_2);
    let started = tokio::time::Instant::now();
    let mut got = 0;
    while let Some(chunk) = slow.chunk().await.unwrap() {
        got += chunk.len();
        let due = Duration::from_micros(got as u64 * 1_000_000 / BYTES_PER_SEC);
        tokio::time::sleep_until(started + due).await;
    }
    assert_eq!(got, LEN);
    assert!(
        gw.metrics()
            .await
            .contains("\nkeygate_cut_off_total{reason=\"client_not_reading\"} 0\n")
    );
}

/// An upstream that answers before it has read the upload and then stops reading, keeping the
/// connection open: once a write to it has waited `body_idle_timeout`, the gateway drops that
/// connection and with it the client's upload, whose connection is then closed, instead of both
/// standing still for as long as the upstream keeps its socket open.
#[tokio::test]
async fn an_upstream_that_stops_reading_the_upload_is_let_go() {
    let dir = tempfile::tempdir().unwrap();
    let up = upstream::answers_early_then_never_reads().await;
    let gw = public_gateway_with(&dir, up, "body_idle_timeout = \"500ms\"");
    let answer = upload_until_let_go(&gw).await;
    assert!(
        answer.starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&answer)
    );
    assert_cut_off(&gw, "upstream_not_reading").await;
}

/// Sends a 1 GiB upload, 64 KiB at a time, until the gateway stops taking it, and returns the
/// answer read meanwhile. Fails if a write stands still for 10 s (the stalled upstream was
/// kept), or if the gateway let go sooner than 400 ms (the tests' idle timeouts are 500 ms).
async fn upload_until_let_go(gw: &Gateway) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    conn.write_all(b"POST /upload HTTP/1.1\r\nhost: test\r\ncontent-length: 1073741824\r\n\r\n")
        .await
        .unwrap();
    let (mut read, mut write) = conn.into_split();
    let answer = tokio::spawn(async move {
        let mut got = Vec::new();
        let _ = read.read_to_end(&mut got).await;
        got
    });
    let chunk = vec![b'x'; 64 * 1024];
    let started = std::time::Instant::now();
    let mut sent = 0usize;
    loop {
        match tokio::time::timeout(Duration::from_secs(10), write.write_all(&chunk)).await {
            Err(_) => panic!(
                "the upload stood still for 10 s after {sent} bytes: the stalled upstream was kept"
            ),
            Ok(Err(_)) => break,
            Ok(Ok(())) => sent += chunk.len(),
        }
        assert!(sent < 1 << 30, "the whole upload went through");
    }
    assert!(started.elapsed() >= Duration::from_millis(400));
    tokio::time::timeout(Duration::from_secs(10), answer)
        .await
        .expect("the client connection stayed open")
        .unwrap()
}

/// An upstream that takes the whole request and then does not answer: 504 once the response
/// timeout has passed since the request's end, with a body as without one.
#[tokio::test]
async fn an_upstream_slow_to_answer_a_post_gets_504() {
    let dir = tempfile::tempdir().unwrap();
    let up = upstream::delayed(Duration::from_secs(5)).await;
    let gw = public_gateway_with(&dir, up, "response_timeout = \"500ms\"");
    let started = std::time::Instant::now();
    let r = client()
        .post(gw.url("/slow"))
        .body(vec![b'x'; 4096])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 504);
    assert_eq!(error_code(r).await, "UPSTREAM_TIMEOUT");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
}

/// A client that sends part of its upload and then nothing gets 408 once `body_idle_timeout`
/// passes (the upstream, still waiting for the rest, has not answered), also when the
/// response timeout is the shorter: it counts from the end of the request.
#[tokio::test]
async fn an_upload_that_stalls_gets_408_after_the_idle_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let got_first = Arc::new(tokio::sync::Notify::new());
    let up = upstream::signals_first_frame(got_first.clone()).await;
    let gw = public_gateway_with(
        &dir,
        up,
        "body_idle_timeout = \"800ms\"\nresponse_timeout = \"300ms\"",
    );
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(4);
    let body = reqwest::Body::wrap_stream(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    }));
    let sent = tokio::spawn(client().post(gw.url("/upload")).body(body).send());
    tx.send(Ok(vec![b'a'; 1000])).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), got_first.notified())
        .await
        .expect("the first part of the upload was not forwarded");
    let r = tokio::time::timeout(Duration::from_secs(10), sent)
        .await
        .expect("the stalled upload was not cut off")
        .unwrap()
        .unwrap();
    assert_eq!(r.status(), 408);
    assert_eq!(error_code(r).await, "REQUEST_TIMEOUT");
    assert_cut_off(&gw, "client_body_stalled").await;
    drop(tx);
}

/// A chunked upload whose framing breaks after part of it went upstream (a bad chunk size, or
/// trailers over the head limit) is the client's fault: 400 without a challenge, not a 502
/// blaming the upstream.
#[tokio::test]
async fn an_upload_whose_chunked_framing_breaks_midway_gets_400() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let got_first = Arc::new(tokio::sync::Notify::new());
    let up = upstream::signals_first_frame(got_first.clone()).await;
    let big_trailer = format!("0\r\nx-big: {}\r\n\r\n", "a".repeat(40_000));
    // Over an HTTP/1.1 upstream connection and over HTTP/2 (the upstream speaks both).
    let gateways = [
        ("", tempfile::tempdir().unwrap()),
        ("http2 = true", tempfile::tempdir().unwrap()),
    ]
    .map(|(settings, dir)| (settings, public_gateway_with(&dir, up, settings), dir));
    for (upstream_settings, gw, _dir) in &gateways {
        for (what, tail) in [
            ("a bad chunk size", "zz\r\nmore\r\n".to_owned()),
            ("a 40 000-byte trailer", big_trailer.clone()),
        ] {
            let what = format!("{what} ({upstream_settings:?})");
            let mut conn = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
            conn.write_all(
            b"POST /upload HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n",
        )
        .await
        .unwrap();
            tokio::time::timeout(Duration::from_secs(5), got_first.notified())
                .await
                .expect("the first chunk was not forwarded");
            conn.write_all(tail.as_bytes()).await.unwrap();
            let mut answer = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(5), async {
                let mut buf = [0u8; 4096];
                while let Ok(n) = conn.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    answer.extend_from_slice(&buf[..n]);
                    if String::from_utf8_lossy(&answer).contains("}") {
                        break;
                    }
                }
            })
            .await;
            let answer = String::from_utf8_lossy(&answer);
            assert!(answer.starts_with("HTTP/1.1 400"), "{what}: {answer}");
            assert!(answer.contains("BODY_MALFORMED"), "{what}: {answer}");
            // The key (none here: a public route) was not the problem.
            assert!(
                !answer.to_ascii_lowercase().contains("www-authenticate"),
                "{what}: {answer}"
            );
        }
    }
}

/// Gaps shorter than the idle timeout, each, however long the whole takes (here longer than the
/// response timeout, which counts from the end of the request): the upload and the answer go
/// through.
#[tokio::test]
async fn an_upload_with_pauses_shorter_than_the_idle_timeout_goes_through() {
    let dir = tempfile::tempdir().unwrap();
    let up = upstream::echo().await;
    let gw = public_gateway_with(
        &dir,
        up,
        "body_idle_timeout = \"800ms\"\nresponse_timeout = \"1s\"",
    );
    let body = reqwest::Body::wrap_stream(futures_util::stream::unfold(0, |i| async move {
        if i == 4 {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(400)).await;
        Some((Ok::<_, std::io::Error>(vec![b'x'; 100]), i + 1))
    }));
    let r = client()
        .post(gw.url("/slow"))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let echoed: Value = r.json().await.unwrap();
    assert_eq!(echoed["body_len"], 400, "{echoed}");
}

#[tokio::test]
async fn a_chunked_response_arrives_whole() {
    let dir = tempfile::tempdir().unwrap();
    let release = Arc::new(tokio::sync::Notify::new());
    let up = upstream::chunked(&["{\"a\":", "1,", "\"b\":2}"], &[], release).await;
    let gw = public_gateway(&dir, up);
    for _ in 0..3 {
        let r = client().get(gw.url("/data")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        // Chunked, or with a `Content-Length` when the gateway had the whole body before
        // answering (framing is hop-by-hop); either way the right length.
        let declared = r.headers().get("content-length").cloned();
        let body = r.text().await.unwrap();
        assert_eq!(body, "{\"a\":1,\"b\":2}");
        if let Some(n) = declared {
            assert_eq!(n.to_str().unwrap(), body.len().to_string());
        }
    }
}

#[tokio::test]
async fn a_streamed_response_is_forwarded_as_it_comes_not_held_back() {
    let dir = tempfile::tempdir().unwrap();
    let release = Arc::new(tokio::sync::Notify::new());
    let up = upstream::chunked(
        &["event: first\n\n"],
        &["event: second\n\n", "event: third\n\n"],
        release.clone(),
    )
    .await;
    let gw = public_gateway(&dir, up);
    let mut r = client().get(gw.url("/events")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    // The upstream sends the rest only once the client has the first event: a gateway that
    // waited for more of the body before answering would time out here.
    let first = tokio::time::timeout(Duration::from_secs(5), r.chunk())
        .await
        .expect("the first event was held back")
        .unwrap()
        .unwrap();
    assert_eq!(&first[..], b"event: first\n\n");
    release.notify_one();
    let mut rest = Vec::new();
    while let Some(chunk) = tokio::time::timeout(Duration::from_secs(5), r.chunk())
        .await
        .expect("the stream stalled")
        .unwrap()
    {
        rest.extend_from_slice(&chunk);
    }
    assert_eq!(rest, b"event: second\n\nevent: third\n\n");
}

#[tokio::test]
async fn a_chunked_upload_is_forwarded_as_it_comes_not_held_back() {
    let dir = tempfile::tempdir().unwrap();
    let got_first = Arc::new(tokio::sync::Notify::new());
    let up = upstream::signals_first_frame(got_first.clone()).await;
    let gw = public_gateway(&dir, up);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(4);
    let body = reqwest::Body::wrap_stream(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    }));
    let sent = tokio::spawn(client().post(gw.url("/upload")).body(body).send());
    tx.send(Ok(vec![b'a'; 1000])).await.unwrap();
    // The client sends the rest only once the upstream has the first part: a gateway that
    // waited for more of the body before forwarding would time out here.
    tokio::time::timeout(Duration::from_secs(5), got_first.notified())
        .await
        .expect("the first part of the upload was held back");
    tx.send(Ok(vec![b'b'; 500])).await.unwrap();
    drop(tx);
    let r = sent.await.unwrap().unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "1500");
}

#[tokio::test]
async fn a_chunked_upload_already_whole_arrives_whole() {
    let dir = tempfile::tempdir().unwrap();
    let up = upstream::echo().await;
    let gw = public_gateway(&dir, up);
    for size in [1usize, 4096, 200_000] {
        let data = vec![b'x'; size];
        let body = reqwest::Body::wrap_stream(futures_util::stream::iter(
            data.chunks(3000)
                .map(|c| Ok::<_, std::io::Error>(c.to_vec()))
                .collect::<Vec<_>>(),
        ));
        let r = client()
            .post(gw.url("/whole"))
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let echoed: Value = r.json().await.unwrap();
        assert_eq!(echoed["body_len"], size, "{echoed}");
        assert_eq!(echoed["body_error"], Value::Null);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upload_waiting_for_100_continue_to_a_down_upstream_gets_502_without_continue() {
    use std::io::{Read, Write};
    let e = env().await;
    let (key, _) = create_key(&e.store, |_| {}).await;
    let mut s = std::net::TcpStream::connect(e.gw.addr).unwrap();
    s.write_all(
        format!(
            "POST /down/upload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\
             Expect: 100-continue\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    // The client is not invited to send a body the gateway cannot forward.
    assert!(
        answer.starts_with("HTTP/1.1 502"),
        "expected a 502 and nothing before it: {answer}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upload_waiting_for_100_continue_is_invited_and_forwarded() {
    use std::io::{BufRead, BufReader, Read, Write};
    let e = env().await;
    let (key, _) = create_key(&e.store, |_| {}).await;
    let mut s = std::net::TcpStream::connect(e.gw.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(
        format!(
            "POST /keep/upload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\
             Expect: 100-continue\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .unwrap();
    let mut reader = BufReader::new(s.try_clone().unwrap());
    let mut status = String::new();
    reader.read_line(&mut status).unwrap();
    assert!(status.starts_with("HTTP/1.1 100"), "{status}");
    s.write_all(b"5\r\nhello\r\n0\r\n\r\n").unwrap();
    let mut rest = String::new();
    let _ = reader.read_to_string(&mut rest);
    assert!(rest.contains("HTTP/1.1 200"), "{rest}");
    assert!(rest.contains("\"body_len\":5"), "{rest}");
}

#[tokio::test]
async fn a_content_length_sent_with_transfer_encoding_is_not_forwarded() {
    // RFC 9112 §6.3: the transfer coding frames the body; the length beside it is wrong (here
    // 3 for a 10-byte body) and must not reach the client.
    let dir = tempfile::tempdir().unwrap();
    let up = upstream::raw(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n\
          a\r\n0123456789\r\n0\r\n\r\n",
    )
    .await;
    let gw = public_gateway(&dir, up);
    // Twice on one client connection: a wrong length would cut the first body or bleed into
    // the second response.
    let c = client();
    for _ in 0..2 {
        let r = c.get(gw.url("/x")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let declared = r.headers().get("content-length").cloned();
        assert_eq!(r.text().await.unwrap(), "0123456789");
        if let Some(n) = declared {
            assert_eq!(n, "10");
        }
    }
}

#[tokio::test]
async fn a_chunked_body_over_the_limit_is_refused_before_the_upstream_is_asked() {
    let dir = tempfile::tempdir().unwrap();
    // Nothing listens upstream: a request that got that far would be a 502, not a 413.
    let gw = Gateway::start(&format!(
        "[store]\nkind = \"embedded\"\npath = \"{}\"\n[upstreams.down]\nurl = \"http://{}\"\n\
         [[routes]]\npath_prefix = \"/\"\nupstream = \"down\"\npublic = true\nmax_body_bytes = 1000\n",
        dir.path().join("keys.db").display(),
        upstream::closed()
    ));
    let chunked = |n: usize| {
        reqwest::Body::wrap_stream(futures_util::stream::iter([Ok::<_, std::io::Error>(
            vec![b'x'; n],
        )]))
    };
    let r = client()
        .post(gw.url("/up"))
        .body(chunked(5000))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    let r = client()
        .post(gw.url("/up"))
        .body(chunked(500))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_get_with_a_streamed_body_keeps_its_body() {
    // Some APIs take a GET with a body (search queries). hyper's client drops the body of a GET
    // whose length it does not know unless told it is chunked: the upstream would get none.
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let up = upstream::echo().await;
    let gw = public_gateway(&dir, up);
    let mut s = std::net::TcpStream::connect(gw.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(
        b"GET /search HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
          5\r\nhello\r\n",
    )
    .unwrap();
    // The rest comes later: the body is still streaming when the request goes upstream.
    std::thread::sleep(Duration::from_millis(300));
    s.write_all(b"6\r\n world\r\n0\r\n\r\n").unwrap();
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("\"body_len\":11"), "{answer}");
    assert!(answer.contains("\"method\":\"GET\""), "{answer}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_http2_get_ended_by_an_empty_data_frame_reaches_the_upstream_without_a_length() {
    let dir = tempfile::tempdir().unwrap();
    let up = upstream::echo().await;
    let gw = public_gateway(&dir, up);
    let h2 = h2_client();
    let r = h2
        .get(gw.url("/x"))
        .body(empty_stream_body())
        .send()
        .await
        .unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.status(), 200);
    let seen: Value = r.json().await.unwrap();
    assert_eq!(seen["body_len"], 0);
    assert_eq!(seen["headers"]["content-length"], Value::Null, "{seen}");
    assert_eq!(seen["headers"]["transfer-encoding"], Value::Null, "{seen}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_http2_post_whose_body_ended_empty_reaches_the_upstream_with_a_zero_length() {
    let dir = tempfile::tempdir().unwrap();
    let up = upstream::echo().await;
    let gw = public_gateway(&dir, up);
    let h2 = h2_client();
    let r = h2
        .post(gw.url("/x"))
        .body(empty_stream_body())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen: Value = r.json().await.unwrap();
    assert_eq!(seen["body_len"], 0);
    // Some upstreams answer 411 to a POST with neither a length nor a transfer coding.
    assert_eq!(seen["headers"]["content-length"][0], "0", "{seen}");
    assert_eq!(seen["headers"]["transfer-encoding"], Value::Null, "{seen}");
}

#[tokio::test]
async fn an_upstream_body_that_fails_before_any_data_is_a_502() {
    // A chunked response whose first chunk size is not a number: nothing of the body can be
    // forwarded, so the client gets a 502 rather than a 200 head and a cut connection.
    let dir = tempfile::tempdir().unwrap();
    let up = upstream::raw(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n").await;
    let gw = public_gateway(&dir, up);
    let r = client().get(gw.url("/x")).send().await.unwrap();
    assert_eq!(r.status(), 502);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "UPSTREAM_UNAVAILABLE", "{body}");
}

/// Review: an upstream answer over keygate's header limits (more than 100 fields, or a head
/// past the 64 KiB read buffer) was answered 502 "cannot be reached" and counted as an outage.
/// It is 502 `UPSTREAM_BAD_RESPONSE` now, outcome `upstream_bad_response`.
#[tokio::test]
async fn an_upstream_response_head_over_the_limits_is_a_502_bad_response() {
    let many: String = (0..200).map(|i| format!("x-h{i}: v\r\n")).collect();
    let large = format!("x-big: {}\r\n", "a".repeat(1024 * 1024));
    for fields in [many, large] {
        let head = format!("HTTP/1.1 200 OK\r\n{fields}content-length: 2\r\n\r\nok");
        let head: &'static [u8] = Box::leak(head.into_bytes().into_boxed_slice());
        let dir = tempfile::tempdir().unwrap();
        let up = upstream::raw(head).await;
        let gw = public_gateway(&dir, up);
        let r = client().get(gw.url("/x")).send().await.unwrap();
        assert_eq!(r.status(), 502);
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], "UPSTREAM_BAD_RESPONSE", "{body}");
        assert_eq!(
            body["error"]["message"],
            "the upstream's response head is too large or malformed"
        );
        let metrics = gw.metrics().await;
        let counted = |outcome: &str| {
            metrics
                .lines()
                .filter(|l| l.starts_with("keygate_requests_total{"))
                .filter(|l| l.contains(&format!("outcome=\"{outcome}\"")))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
                .sum::<u64>()
        };
        assert_eq!(counted("upstream_bad_response"), 1, "{metrics}");
        assert_eq!(counted("upstream_error"), 0, "{metrics}");
    }
}

/// Sends one keep-alive request on `conn` and returns the answer's status line, or `None` if
/// nothing arrives within `wait`.
async fn status_line(conn: &mut tokio::net::TcpStream, wait: Duration) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    conn.write_all(b"GET /public/x HTTP/1.1\r\nhost: t\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(wait, conn.read(&mut buf))
        .await
        .ok()?
        .unwrap();
    let text = String::from_utf8_lossy(&buf[..n]);
    text.lines().next().map(str::to_owned)
}

/// The `THP_enabled` line of a process's /proc status: 0 once THP is disabled for it.
#[cfg(target_os = "linux")]
fn thp_enabled(pid: u32) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("THP_enabled:"));
    line.unwrap_or_else(|| panic!("no THP_enabled in\n{status}"))
        .split_whitespace()
        .nth(1)
        .unwrap()
        .to_owned()
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn transparent_huge_pages_are_off_unless_configured() {
    for (proxy_section, expected) in [("", "0"), ("transparent_huge_pages = true", "1")] {
        let e = env_with(proxy_section).await;
        assert_eq!(thp_enabled(e.gw.pid()), expected, "{proxy_section:?}");
        let r = client().get(e.gw.url("/public/x")).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn proxy_threads_share_one_socket_and_one_connection_limit() {
    let e = env_with("worker_threads = 4\nmax_connections = 3").await;
    // Three threads besides the main one, each with its own scheduler (started just after the
    // address is printed).
    let names = || {
        let tasks = std::fs::read_dir(format!("/proc/{}/task", e.gw.pid())).unwrap();
        tasks
            .filter_map(|t| std::fs::read_to_string(t.unwrap().path().join("comm")).ok())
            .map(|n| n.trim().to_owned())
            .filter(|n| n.starts_with("keygate-proxy-"))
            .collect::<std::collections::BTreeSet<_>>()
    };
    let want: std::collections::BTreeSet<String> =
        (1..4).map(|i| format!("keygate-proxy-{i}")).collect();
    let started = eventually(Duration::from_secs(5), || async { names() == want }).await;
    assert!(started, "proxy threads {:?}, expected {want:?}", names());

    // Many clients at once, each on its own connection: every one answered, whichever thread
    // took it.
    let answers = futures_util::future::join_all((0..40).map(|_| async {
        let mut conn = tokio::net::TcpStream::connect(e.gw.addr).await.unwrap();
        status_line(&mut conn, Duration::from_secs(10)).await
    }))
    .await;
    for a in &answers {
        assert_eq!(a.as_deref(), Some("HTTP/1.1 200 OK"), "{answers:?}");
    }
    // Each thread counts into its own series; a scrape reports their sum, under one name.
    let text = e.gw.metrics().await;
    for (series, want) in [
        (
            "keygate_requests_total{outcome=\"forwarded\",route=\"public\"}",
            "40",
        ),
        (
            "keygate_request_duration_seconds_count{outcome=\"forwarded\",route=\"public\"}",
            "40",
        ),
        (
            "keygate_upstream_duration_seconds_count{upstream=\"echo\"}",
            "40",
        ),
        ("keygate_in_flight_requests", "0"),
    ] {
        let line = format!("{series} {want}\n");
        assert!(text.contains(&line), "no {line:?} in\n{text}");
    }
    assert_eq!(text.matches("# TYPE keygate_requests_total ").count(), 1);

    // max_connections counts the threads' connections together: three held open, the fourth
    // waits in the backlog until one of them closes.
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut conn = tokio::net::TcpStream::connect(e.gw.addr).await.unwrap();
        let first = status_line(&mut conn, Duration::from_secs(10)).await;
        assert_eq!(first.as_deref(), Some("HTTP/1.1 200 OK"));
        held.push(conn);
    }
    let mut fourth = tokio::net::TcpStream::connect(e.gw.addr).await.unwrap();
    let early = status_line(&mut fourth, Duration::from_millis(700)).await;
    assert_eq!(
        early, None,
        "a fourth connection was served past max_connections = 3"
    );
    drop(held.pop());
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), fourth.read(&mut buf))
        .await
        .expect("the waiting connection was not served after a slot freed")
        .unwrap();
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 200 OK"),
        "{:?}",
        String::from_utf8_lossy(&buf[..n])
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn work_stealing_serves_from_one_pool() {
    let e = env_with("worker_threads = 3\nwork_stealing = true").await;
    let answers = futures_util::future::join_all((0..20).map(|_| async {
        let mut conn = tokio::net::TcpStream::connect(e.gw.addr).await.unwrap();
        status_line(&mut conn, Duration::from_secs(10)).await
    }))
    .await;
    for a in &answers {
        assert_eq!(a.as_deref(), Some("HTTP/1.1 200 OK"), "{answers:?}");
    }
    let tasks = std::fs::read_dir(format!("/proc/{}/task", e.gw.pid())).unwrap();
    let names: Vec<String> = tasks
        .filter_map(|t| std::fs::read_to_string(t.unwrap().path().join("comm")).ok())
        .collect();
    assert!(
        names.iter().all(|n| !n.starts_with("keygate-proxy-")),
        "{names:?}"
    );
    assert!(
        names
            .iter()
            .filter(|n| n.starts_with("tokio-rt-worker"))
            .count()
            >= 3,
        "{names:?}"
    );
}

/// An HTTP/2 (prior knowledge) client connection to `addr`: its sender, and its connection
/// task, which ends when the gateway closes the connection.
async fn h2_connection(
    addr: std::net::SocketAddr,
) -> (
    hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>,
    tokio::task::JoinHandle<Result<(), hyper::Error>>,
) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    (sender, tokio::spawn(conn))
}

fn h2_get(
    addr: std::net::SocketAddr,
    path: &str,
) -> http::Request<http_body_util::Empty<bytes::Bytes>> {
    http::Request::get(format!("http://{addr}{path}"))
        .body(http_body_util::Empty::new())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_http2_connections_are_closed_and_busy_ones_kept() {
    let e = env_with("idle_timeout = \"1s\"").await;
    let addr = e.gw.addr;

    // HTTP/2: requests every 300 ms keep the connection for 3.5 s (over three idle timeouts).
    let (mut sender, conn) = h2_connection(addr).await;
    for _ in 0..12 {
        let r = sender
            .send_request(h2_get(addr, "/public/x"))
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(!conn.is_finished(), "a busy HTTP/2 connection was closed");
    // Then idle: closed within two idle timeouts (and some slack), cleanly.
    let closed = tokio::time::timeout(Duration::from_secs(4), conn).await;
    assert!(
        matches!(closed, Ok(Ok(Ok(())))),
        "an idle HTTP/2 connection was not closed gracefully: {closed:?}"
    );

    // (HTTP/1.1: idle_keep_alive_connections_are_closed_after_the_header_timeout.)
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idle_close_lets_the_request_in_flight_finish() {
    let dir = tempfile::tempdir().unwrap();
    let slow = upstream::delayed(Duration::from_millis(2500)).await;
    let gw = Gateway::start(&format!(
        "[proxy]\nidle_timeout = \"1s\"\n[store]\nkind = \"embedded\"\npath = \"{}\"\n\
         [upstreams.slow]\nurl = \"http://{slow}\"\n[[routes]]\npath_prefix = \"/\"\n\
         upstream = \"slow\"\npublic = true\n",
        dir.path().join("keys.db").display()
    ));
    let (mut sender, conn) = h2_connection(gw.addr).await;
    // One request, answered after 2.5 s: no new request meanwhile, so the connection is told
    // to go (GOAWAY) while it runs; the answer still comes, then the connection closes.
    let r = sender.send_request(h2_get(gw.addr, "/slow")).await.unwrap();
    assert_eq!(r.status(), 200);
    let body = http_body_util::BodyExt::collect(r.into_body())
        .await
        .unwrap();
    assert_eq!(body.to_bytes().as_ref(), b"done");
    let closed = tokio::time::timeout(Duration::from_secs(4), conn).await;
    assert!(matches!(closed, Ok(Ok(Ok(())))), "{closed:?}");
}

#[tokio::test]
async fn a_101_to_a_request_that_asked_for_no_upgrade_is_a_502() {
    // RFC 9110 §15.2.2: a server may switch only to a protocol the client's Upgrade named.
    // An upstream that switches anyway is broken, and its 101 must not reach a client that
    // would then be left without an answer.
    let dir = tempfile::tempdir().unwrap();
    let up = upstream::raw(
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
    )
    .await;
    let gw = public_gateway(&dir, up);
    let c = client();
    for _ in 0..2 {
        let r = c.get(gw.url("/x")).send().await.unwrap();
        assert_eq!(r.status(), 502);
    }
    let r = h2_client().get(gw.url("/x")).send().await.unwrap();
    assert_eq!(r.status(), 502);
}

#[tokio::test]
async fn case_insensitive_paths_keep_a_routes_rules_on_every_spelling() {
    // In front of an upstream that routes without regard to case (Express's default), `/ADMIN`
    // is its `/admin`: with the setting it meets the `/admin` route's rules too.
    let dir = tempfile::tempdir().unwrap();
    let echo = upstream::echo().await;
    let config = |insensitive: bool| {
        format!(
            "[proxy]\ncase_insensitive_paths = {insensitive}\n[store]\nkind = \"embedded\"\n\
             path = \"{}\"\n[upstreams.app]\nurl = \"http://{echo}\"\n\
             [[routes]]\nname = \"admin\"\npath_prefix = \"/admin\"\nupstream = \"app\"\n\
             scopes = [\"admin\"]\n\
             [[routes]]\nname = \"rest\"\npath_prefix = \"/\"\nupstream = \"app\"\npublic = true\n",
            dir.path().join("keys.db").display()
        )
    };
    let gw = Gateway::start(&config(true));
    for path in ["/admin/users", "/ADMIN/users", "/Admin", "/aDmIn/"] {
        let r = client().get(gw.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 401, "{path}");
    }
    let r = client().get(gw.url("/admins")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    // `ſ` is `s` to Java's equalsIgnoreCase, `K` (Kelvin) `k`: refused, not routed.
    for path in ["/%C5%BFecret", "/\u{17F}ecret", "/%E2%84%AAey", "/x/%C4%B1"] {
        let (status, body) =
            raw_request(gw.addr, format!("GET {path} HTTP/1.1\r\nHost: x\r\n")).await;
        assert_eq!(status, 400, "{path}");
        assert!(body.contains("PATH_NOT_CANONICAL"), "{path}: {body}");
    }
    drop(gw);
    // Without it (the default, nginx's way) the spelling decides.
    let gw = Gateway::start(&config(false));
    let r = client().get(gw.url("/ADMIN/users")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = client().get(gw.url("/admin/users")).send().await.unwrap();
    assert_eq!(r.status(), 401);
}

/// SIGHUP reloads TLS material; a gateway with no TLS must live through it (its default
/// action ended the process at once, exit 129, no drain) and keep serving.
#[tokio::test(flavor = "multi_thread")]
async fn sighup_without_tls_neither_stops_nor_disturbs_the_gateway() {
    let mut e = env().await;
    let (key, _) = create_key(&e.store, |_| {}).await;
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &e.gw.pid().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = client()
        .get(e.gw.url("/api/x"))
        .bearer_auth(&key)
        .send()
        .await
        .expect("the gateway is gone after SIGHUP");
    assert_eq!(r.status(), 200);
    let status = tokio::task::spawn_blocking(move || e.gw.terminate())
        .await
        .unwrap();
    assert!(status.success(), "exit status {status:?}");
}

/// Waits (up to 5 s) until `gw` counts `n` requests in flight.
async fn until_in_flight(gw: &Gateway, n: usize) {
    let line = format!("\nkeygate_in_flight_requests {n}\n");
    let waiting = eventually(Duration::from_secs(5), || async {
        gw.metrics().await.contains(&line)
    })
    .await;
    assert!(waiting, "{n} request(s) never showed as in flight");
}

/// A request still waiting on its upstream when the drain time runs out is cut by keygate,
/// not by its client: its access line says so (status 444, outcome `drain_cut_off`), and it
/// reaches the log. Before, the line came after the log writer had closed, so it was lost
/// (a "[tracing-subscriber] Unable to write an event" on stderr instead), and it blamed the
/// client (499, `client_closed`).
#[tokio::test(flavor = "multi_thread")]
async fn a_request_cut_off_by_the_drain_is_logged_as_such() {
    use tokio::io::AsyncWriteExt;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("keygate.log");
    let silent = upstream::silent().await;
    let mut gw = Gateway::start_logging_to(
        &format!(
            "[proxy]\ndrain_timeout = \"300ms\"\n[store]\nkind = \"embedded\"\npath = \"{}\"\n\
             [upstreams.silent]\nurl = \"http://{silent}\"\nresponse_timeout = \"60s\"\n\
             [[routes]]\nname = \"hangs\"\npath_prefix = \"/\"\nupstream = \"silent\"\n\
             public = true\n",
            dir.path().join("keys.db").display()
        ),
        &log,
    );
    let mut conn = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    conn.write_all(b"GET /wait HTTP/1.1\r\nHost: x\r\nX-Request-Id: cut-by-drain\r\n\r\n")
        .await
        .unwrap();
    until_in_flight(&gw, 1).await;
    let status = tokio::task::spawn_blocking(move || gw.terminate())
        .await
        .unwrap();
    assert!(status.success(), "exit status {status:?}");
    drop(conn);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains("Unable to write"), "{text}");
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("cut-by-drain"))
        .collect();
    assert_eq!(lines.len(), 1, "{text}");
    assert!(lines[0].contains("status=444"), "{}", lines[0]);
    assert!(
        lines[0].contains("outcome=\"drain_cut_off\""),
        "{}",
        lines[0]
    );
}

/// Review: a request still under way when the drain time ran out went on, and was answered,
/// for as long as the last usage flush kept the process up (up to 5 s more with the store
/// failing it). The drain's end now ends the connections' tasks at once.
#[tokio::test(flavor = "multi_thread")]
async fn the_drain_time_ends_requests_even_while_the_last_flush_waits() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("keys.db");
    let slow = upstream::delayed(Duration::from_secs(3)).await;
    let store: Arc<dyn KeyStore> = Arc::new(EmbeddedStore::open(&db).unwrap());
    let (key, _) = create_key(&store, |_| {}).await;
    let log = dir.path().join("keygate.log");
    let mut gw = Gateway::start_logging_to(
        &format!(
            "[proxy]\ndrain_timeout = \"500ms\"\n[usage]\nflush_interval = \"60s\"\n\
         [store]\nkind = \"embedded\"\npath = \"{}\"\n\
         [upstreams.slow]\nurl = \"http://{slow}\"\n\
         [[routes]]\nname = \"slow\"\npath_prefix = \"/\"\nupstream = \"slow\"\n",
            db.display()
        ),
        &log,
    );
    let mut conn = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    conn.write_all(
        format!("GET /wait HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    // And one over HTTP/2, whose streams run apart from their connection's task.
    let h2 = {
        let (url, key) = (gw.url("/wait"), key.clone());
        tokio::spawn(async move {
            let r = h2_client().get(url).bearer_auth(key).send().await;
            r.map(|r| r.status().as_u16())
        })
    };
    until_in_flight(&gw, 2).await;
    // Another process holds the database's write lock: the last usage flush (this request's
    // count) waits and retries for up to 5 s.
    let lock = rusqlite::Connection::open(&db).unwrap();
    lock.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let started = std::time::Instant::now();
    let _ = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(gw.pid().to_string())
        .status();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut answer)).await;
    let closed_after = started.elapsed();
    assert!(read.is_ok(), "the connection stayed open");
    assert!(
        !String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"),
        "answered after the drain time: {}",
        String::from_utf8_lossy(&answer)
    );
    assert!(
        closed_after < Duration::from_secs(2),
        "closed after {closed_after:?}"
    );
    let h2 = tokio::time::timeout(Duration::from_secs(2), h2).await;
    assert!(
        matches!(h2, Ok(Ok(Err(_)))),
        "the HTTP/2 request was not ended: {h2:?}"
    );
    drop(lock);
    let status = tokio::task::spawn_blocking(move || gw.terminate())
        .await
        .unwrap();
    assert!(status.success(), "exit status {status:?}");
    // Both were ended by keygate at the drain's end, neither forwarded an answer later.
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("keygate::access") && l.contains("route=\"slow\""))
        .collect();
    assert_eq!(lines.len(), 2, "{text}");
    for line in lines {
        assert!(line.contains("status=444"), "{line}");
    }
}

/// While the proxy drains, the admin listener stays open: `/readyz` answers 503 "shutting
/// down" (it was a refused connection, which docs/deploy.md did not say) and `/metrics` can
/// still be scraped. It closes once the proxy has drained.
#[tokio::test(flavor = "multi_thread")]
async fn the_admin_listener_answers_not_ready_through_the_drain() {
    use tokio::io::AsyncWriteExt;
    let dir = tempfile::tempdir().unwrap();
    let silent = upstream::silent().await;
    let mut gw = Gateway::start(&format!(
        "[proxy]\ndrain_timeout = \"3s\"\n[store]\nkind = \"embedded\"\npath = \"{}\"\n\
         [upstreams.silent]\nurl = \"http://{silent}\"\nresponse_timeout = \"60s\"\n\
         [[routes]]\nname = \"hangs\"\npath_prefix = \"/\"\nupstream = \"silent\"\n\
         public = true\n",
        dir.path().join("keys.db").display()
    ));
    assert_eq!(
        client()
            .get(gw.admin_url("/readyz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let mut conn = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    conn.write_all(b"GET /wait HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    until_in_flight(&gw, 1).await;
    let readyz = gw.admin_url("/readyz");
    let metrics = gw.admin_url("/metrics");
    let exited = tokio::task::spawn_blocking(move || gw.terminate());
    let unready = eventually(Duration::from_secs(2), || async {
        match client().get(&readyz).send().await {
            Ok(r) if r.status() == 503 => r.text().await.unwrap().contains("shutting down"),
            _ => false,
        }
    })
    .await;
    assert!(unready, "/readyz did not answer 503 during the drain");
    let scraped = client().get(&metrics).send().await.unwrap();
    assert_eq!(scraped.status(), 200);
    assert!(exited.await.unwrap().success());
    drop(conn);
}

/// An upstream that is down fails every request; its warning is logged once a second at most,
/// the next line saying how many were left out, not once per request.
#[tokio::test]
async fn upstream_failures_are_logged_once_a_second_with_the_count_left_out() {
    const BURST: usize = 30;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("keygate.log");
    let down = upstream::closed();
    let gw = Gateway::start_logging_to(
        &format!(
            "[store]\nkind = \"embedded\"\npath = \"{}\"\n[upstreams.down]\n\
             url = \"http://{down}\"\n[[routes]]\n\
             name = \"down\"\npath_prefix = \"/\"\nupstream = \"down\"\npublic = true\n",
            dir.path().join("keys.db").display()
        ),
        &log,
    );
    let get = || async { client().get(gw.url("/x")).send().await.unwrap().status() };
    let statuses = futures_util::future::join_all((0..BURST).map(|_| get())).await;
    assert!(statuses.iter().all(|s| *s == 502), "{statuses:?}");
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    let warnings = || {
        read()
            .lines()
            .filter(|l| l.contains("upstream request failed"))
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    // Every request's access line is out, so every warning that was due is too.
    assert!(
        eventually(Duration::from_secs(5), || async {
            read().matches("status=502").count() == BURST
        })
        .await,
        "{}",
        read()
    );
    assert_eq!(warnings().len(), 1, "{:?}", warnings());

    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(get().await, 502);
    assert!(
        eventually(Duration::from_secs(5), || async { warnings().len() == 2 }).await,
        "{:?}",
        warnings()
    );
    let left_out = format!("unlogged={}", BURST - 1);
    assert!(warnings()[1].contains(&left_out), "{:?}", warnings());
}

/// An upstream that answers the first request on each connection (keep-alive), and the second
/// as an upstream whose keep-alive timeout ran out as it came: `close` closes without a word,
/// `408` sends its idle-timeout 408 and closes.
async fn closes_on_its_second_request(mode: &'static str) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                for n in 0.. {
                    let mut seen = Vec::new();
                    // The head (the tests' requests have no body, or a small one in the head's
                    // read).
                    while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                        match conn.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(k) => seen.extend_from_slice(&buf[..k]),
                        }
                    }
                    if n == 0 {
                        let _ = conn
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                            .await;
                        continue;
                    }
                    if mode == "408" {
                        let _ = conn
                            .write_all(
                                b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-length: 0\r\n\r\n",
                            )
                            .await;
                    }
                    return;
                }
            });
        }
    });
    addr
}

/// Review: a request written on a pooled connection just as the upstream closed it (its
/// keep-alive timeout) was answered 502, or with the 408 the upstream sent as it closed. An
/// idempotent request without a body is sent once more on a new connection; a POST is not.
#[tokio::test]
async fn an_idempotent_request_meeting_a_closing_keep_alive_connection_is_sent_again() {
    for mode in ["close", "408"] {
        let dir = tempfile::tempdir().unwrap();
        let up = closes_on_its_second_request(mode).await;
        let gw = public_gateway_with(&dir, up, "");
        let c = client();
        let get = || c.get(gw.url("/x")).send();
        assert_eq!(get().await.unwrap().status(), 200, "{mode}");
        // Idle long enough to be at risk of the race.
        tokio::time::sleep(Duration::from_millis(400)).await;
        let r = get().await.unwrap();
        assert_eq!(r.status(), 200, "{mode}: the GET was not sent again");
        assert_eq!(r.text().await.unwrap(), "ok");
        // A POST is the client's to retry.
        tokio::time::sleep(Duration::from_millis(400)).await;
        let r = c.post(gw.url("/x")).body("a=1").send().await.unwrap();
        assert_ne!(r.status(), 200, "{mode}: the POST was sent again");
    }
}

/// Review: a 101 switching to a protocol the client did not ask for (h2c: every later request
/// on the spliced connection would pass keygate unseen), or naming none, was relayed and
/// spliced. It is a 502 now.
#[tokio::test]
async fn a_switch_to_a_protocol_not_asked_for_is_refused() {
    for answer in [
        &b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\nRAW"[..],
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n\r\nRAW",
    ] {
        let dir = tempfile::tempdir().unwrap();
        let up = upstream::raw(answer).await;
        let gw = public_gateway_with(&dir, up, "");
        let request =
            b"GET /ws HTTP/1.1\r\nHost: t\r\nConnection: Upgrade, close\r\nUpgrade: websocket\r\n\
            Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
        let (status, body) = raw_exchange(gw.addr, request).await;
        assert!(status.contains(" 502 "), "{status}");
        assert!(!body.contains("RAW"), "{body}");
    }
}

/// Review: an idle upstream connection was closed only by its proxy thread's next request, so
/// with no traffic it stayed open past `pool_idle_timeout` for ever. It is closed about
/// `pool_idle_timeout` after its last answer now, with no request after it.
#[tokio::test]
async fn an_idle_upstream_connection_is_closed_after_pool_idle_timeout_with_no_request() {
    let dir = tempfile::tempdir().unwrap();
    let (up, mut closed) = upstream::reports_close(false).await;
    let gw = public_gateway_with(&dir, up, "pool_idle_timeout = \"300ms\"");
    let r = client().get(gw.url("/x")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "ok");
    let (after, _) = tokio::time::timeout(Duration::from_secs(3), closed.recv())
        .await
        .expect("keygate kept the idle connection open past pool_idle_timeout")
        .unwrap();
    assert!(
        after >= Duration::from_millis(250),
        "closed too early: {after:?}"
    );
    assert!(after < Duration::from_millis(1500), "{after:?}");
}

/// An upstream that closes an idle connection (its keep-alive timeout) gets keygate's close
/// at once, long before `pool_idle_timeout`: hyper's connection task reads the FIN and drops
/// the socket, which is not left in CLOSE_WAIT until the next request.
#[tokio::test]
async fn an_upstream_closing_an_idle_connection_gets_keygates_close_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let (up, mut closed) = upstream::reports_close(true).await;
    let gw = public_gateway_with(&dir, up, "pool_idle_timeout = \"60s\"");
    let r = client().get(gw.url("/x")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "ok");
    let (after, _) = tokio::time::timeout(Duration::from_secs(3), closed.recv())
        .await
        .expect("keygate left the connection the upstream closed open (CLOSE_WAIT)")
        .unwrap();
    assert!(after < Duration::from_millis(500), "{after:?}");
}
