//! The admin API's JSON: request bodies (strict: unknown fields refused, errors name the field
//! by its path), query parameters, and the shapes of keys, members and audit events in
//! responses. A key's value appears only where the caller passes it in (create, rotate, reveal).

use super::error::AdminError;
use crate::auth::record::{KeyRecord, KeyType};
use crate::store::{AuditEvent, Member, Role};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

/// Parses a JSON body, naming the offending field (`scope_names[1]`) when it is wrong.
/// Every body is a JSON object: serde would also read a struct from a positional array
/// (`["shared","name"]`), which no client means and which would slip past `deny_unknown_fields`.
pub fn parse_body<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, AdminError> {
    let first = bytes
        .iter()
        .find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'));
    if first != Some(&b'{') {
        return Err(AdminError::bad("body", "must be a JSON object"));
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." { "body".to_owned() } else { path };
        AdminError::bad(field, e.into_inner().to_string())
    })?;
    de.end()
        .map_err(|e| AdminError::bad("body", e.to_string()))?;
    Ok(value)
}

/// A string or a list of strings (the seeds accept both for `scope_names` and `allow_ips`).
/// `null` reads as the empty list: on create, where absent means "none" too.
fn one_or_many<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    d.deserialize_any(OneOrMany {
        null: NullIs::Empty,
    })
}

/// [`one_or_many`] for a change (`PATCH`): `null` is refused, naming the field. Read as `[]`
/// it would lift the key's restrictions (any address, no scope) for a client that sends
/// `null` for "unchanged", as `name`, `is_enabled` and `metadata` take it; `[]` clears.
fn one_or_many_not_null<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    d.deserialize_any(OneOrMany {
        null: NullIs::Refused,
    })
}

/// What a `null` list means.
#[derive(Clone, Copy)]
enum NullIs {
    Empty,
    Refused,
}

struct OneOrMany {
    null: NullIs,
}

impl OneOrMany {
    fn null<E: de::Error>(self) -> Result<Option<Vec<String>>, E> {
        match self.null {
            NullIs::Empty => Ok(Some(Vec::new())),
            NullIs::Refused => Err(E::custom(
                "must not be null: leave it out to keep the list, or give [] to clear it",
            )),
        }
    }
}

impl<'de> Visitor<'de> for OneOrMany {
    type Value = Option<Vec<String>>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string or a list of strings")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Some(vec![v.to_owned()]))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::new();
        while let Some(s) = seq.next_element::<String>()? {
            out.push(s);
        }
        Ok(Some(out))
    }
    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        self.null()
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        self.null()
    }
}

/// Distinguishes "absent" (outer `None`) from `null` (inner `None`).
fn nullable<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

/// `metadata`: a string map in which a key given twice is refused, naming it. Read into a
/// map as it comes, the last one would silently win (serde's derive refuses a repeated
/// struct field, but a map takes what it is given). `null` reads as absent.
fn unique_map<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<BTreeMap<String, String>>, D::Error> {
    Option::<UniqueMap>::deserialize(d).map(|m| m.map(|m| m.0))
}

struct UniqueMap(BTreeMap<String, String>);

impl<'de> Deserialize<'de> for UniqueMap {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = UniqueMap;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object of strings")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out = BTreeMap::new();
                while let Some(k) = map.next_key::<String>()? {
                    if out.contains_key(&k) {
                        return Err(de::Error::custom(format!("key {k:?} is given twice")));
                    }
                    let v = map.next_value::<String>()?;
                    out.insert(k, v);
                }
                Ok(UniqueMap(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// `expires_in`: seconds as an integer, or a duration like `"30d"` / `"12h 30m"`.
fn duration_in<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    struct V;
    impl Visitor<'_> for V {
        type Value = Option<Duration>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a number of seconds or a duration such as \"30d\"")
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
            Ok(Some(Duration::from_secs(v)))
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
            u64::try_from(v)
                .map(|v| Some(Duration::from_secs(v)))
                .map_err(|_| E::custom("must not be negative"))
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
            humantime::parse_duration(v)
                .map(Some)
                .map_err(|e| E::custom(format!("{v:?} is not a duration: {e}")))
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
    }
    d.deserialize_any(V)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateBody {
    pub key_type: KeyType,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub team_id: Option<String>,
    #[serde(default, deserialize_with = "one_or_many")]
    pub scope_names: Option<Vec<String>>,
    #[serde(default, deserialize_with = "one_or_many")]
    pub allow_ips: Option<Vec<String>>,
    #[serde(default)]
    pub is_enabled: Option<bool>,
    #[serde(default)]
    pub behalf_of_user_id: Option<String>,
    #[serde(default, deserialize_with = "duration_in")]
    pub expires_in: Option<Duration>,
    #[serde(default)]
    pub expires_at: Option<DateTime<Utc>>,
    #[serde(default, deserialize_with = "unique_map")]
    pub metadata: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct PatchBody {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub description: Option<Option<String>>,
    #[serde(default, deserialize_with = "one_or_many_not_null")]
    pub scope_names: Option<Vec<String>>,
    #[serde(default, deserialize_with = "one_or_many_not_null")]
    pub allow_ips: Option<Vec<String>>,
    #[serde(default)]
    pub is_enabled: Option<bool>,
    #[serde(default, deserialize_with = "nullable")]
    pub behalf_of_user_id: Option<Option<String>>,
    #[serde(default, deserialize_with = "nullable")]
    pub expires_at: Option<Option<DateTime<Utc>>>,
    #[serde(default, deserialize_with = "unique_map")]
    pub metadata: Option<BTreeMap<String, String>>,
}

impl PatchBody {
    /// Whether the change only takes power away: disabling, or lowering nothing else.
    pub fn only_disables(&self) -> bool {
        matches!(
            self,
            PatchBody {
                name: None,
                description: None,
                scope_names: None,
                allow_ips: None,
                is_enabled: Some(false),
                behalf_of_user_id: None,
                expires_at: None,
                metadata: None,
            }
        )
    }
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RotateBody {
    #[serde(default)]
    pub grace_seconds: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemberBody {
    pub role: Role,
}

/// The key object. `full`: the single-key view (scopes, IPs, metadata…); otherwise the
/// partial object of listings.
pub fn key(r: &KeyRecord, full: bool, key_value: Option<&str>) -> Value {
    key_with_usage(r, full, key_value, None)
}

/// The full key object with its usage (`request_count`, `last_used_time`) from the store.
pub fn key_with_usage(
    r: &KeyRecord,
    full: bool,
    key_value: Option<&str>,
    usage: Option<&crate::store::Usage>,
) -> Value {
    let mut v = json!({
        "@type": "api_key",
        "api_key_id": r.api_key_id,
        "name": r.name,
        "description": r.description.clone().unwrap_or_default(),
        "key_type": r.key_type,
        "team_id": r.team_id,
        "key_start": r.key_start,
        "is_enabled": r.is_enabled,
        "created_time": r.created_time,
        "expires_time": r.expires_time,
        "behalf_of_user_info": r.behalf_of_user_id.as_ref().map(|u| json!({"@type": "user", "user_id": u})),
    });
    if full && let Some(obj) = v.as_object_mut() {
        obj.insert("key_value".into(), json!(key_value));
        obj.insert("scope_names".into(), json!(r.scope_names));
        obj.insert(
            "allow_ips".into(),
            json!(r.allow_ips.iter().map(ip_text).collect::<Vec<_>>()),
        );
        obj.insert("behalf_of_user_id".into(), json!(r.behalf_of_user_id));
        obj.insert("created_by".into(), json!(r.created_by));
        obj.insert("updated_time".into(), json!(r.updated_time));
        obj.insert(
            "last_used_time".into(),
            json!(usage.and_then(|u| u.last_used_time).or(r.last_used_time)),
        );
        obj.insert(
            "request_count".into(),
            json!(usage.map_or(0, |u| u.request_count)),
        );
        obj.insert("metadata".into(), json!(r.metadata));
    }
    v
}

/// Single addresses are shown as given (`127.0.0.1`), blocks in CIDR form.
fn ip_text(n: &ipnet::IpNet) -> String {
    if n.prefix_len() == n.max_prefix_len() {
        n.addr().to_string()
    } else {
        n.to_string()
    }
}

pub fn member(m: &Member) -> Value {
    json!({
        "@type": "member",
        "team_id": m.team_id,
        "user_id": m.user_id,
        "role": m.role,
        "added_time": m.added_time,
    })
}

pub fn audit_event(e: &AuditEvent) -> Value {
    json!({
        "@type": "audit_event",
        "event_id": e.event_id,
        "time": e.time,
        "actor": e.actor,
        "action": e.action,
        "api_key_id": e.api_key_id,
        "team_id": e.team_id,
        "user_id": e.user_id,
        "client_ip": e.client_ip,
        "request_id": e.request_id,
        "client_request_id": e.client_request_id,
        "details": e.details,
    })
}

/// Query parameters, decoded; a parameter given twice is refused.
pub struct Query(BTreeMap<String, String>);

impl Query {
    pub fn parse(raw: Option<&str>) -> Result<Self, AdminError> {
        let mut map = BTreeMap::new();
        for (k, v) in form_urlencoded::parse(raw.unwrap_or("").as_bytes()) {
            if map.insert(k.to_string(), v.to_string()).is_some() {
                return Err(AdminError::bad(k.to_string(), "given more than once"));
            }
        }
        Ok(Self(map))
    }

    pub fn str(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    pub fn bool(&self, name: &str) -> Result<Option<bool>, AdminError> {
        match self.str(name) {
            None => Ok(None),
            Some("true") | Some("1") => Ok(Some(true)),
            Some("false") | Some("0") => Ok(Some(false)),
            Some(_) => Err(AdminError::bad(name, "must be true or false")),
        }
    }

    /// The first of `names` given (a parameter and its aliases, `per_page` and `perPage`); more
    /// than one of them is refused, as one parameter given twice is.
    pub fn u32_in(&self, names: &[&str], default: u32, max: u32) -> Result<u32, AdminError> {
        let given: Vec<&str> = names
            .iter()
            .copied()
            .filter(|n| self.0.contains_key(*n))
            .collect();
        if let [first, second, ..] = given.as_slice() {
            return Err(AdminError::bad(
                *second,
                format!("give {first} or {second}, not both"),
            ));
        }
        for name in names {
            if let Some(v) = self.str(name) {
                return match v.parse::<u32>() {
                    Ok(n) if (1..=max).contains(&n) => Ok(n),
                    _ => Err(AdminError::bad(
                        *name,
                        format!("must be a number from 1 to {max}"),
                    )),
                };
            }
        }
        Ok(default)
    }

    pub fn time(&self, name: &str) -> Result<Option<DateTime<Utc>>, AdminError> {
        self.str(name)
            .map(|v| {
                DateTime::parse_from_rfc3339(v)
                    .map(|t| t.with_timezone(&Utc))
                    .map_err(|_| {
                        AdminError::bad(name, "must be an RFC 3339 time, e.g. 2026-01-31T12:00:00Z")
                    })
            })
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn scope_names_accept_string_or_list() {
        let b: CreateBody =
            parse_body(br#"{"key_type":"shared","scope_names":"a","allow_ips":["1.2.3.4","::1"]}"#)
                .unwrap();
        assert_eq!(b.scope_names, Some(vec!["a".to_string()]));
        assert_eq!(b.allow_ips.unwrap().len(), 2);
    }

    #[test]
    fn errors_name_the_field() {
        let e =
            parse_body::<CreateBody>(br#"{"key_type":"shared","scope_names":[1]}"#).unwrap_err();
        assert!(
            matches!(&e, AdminError::BadRequest { field, .. } if field == "scope_names[0]"),
            "{e:?}"
        );
        let e = parse_body::<CreateBody>(br#"{"key_type":"shared","colour":"red"}"#).unwrap_err();
        assert!(e.to_string().contains("colour"), "{e}");
        let e = parse_body::<CreateBody>(br#"{"name":"x"}"#).unwrap_err();
        assert!(e.to_string().contains("key_type"), "{e}");
        let e = parse_body::<CreateBody>(br#"{"key_type":"robot"}"#).unwrap_err();
        assert!(
            matches!(&e, AdminError::BadRequest { field, .. } if field == "key_type"),
            "{e:?}"
        );
        let e = parse_body::<CreateBody>(br#"{"key_type":"shared"} trailing"#).unwrap_err();
        assert!(matches!(&e, AdminError::BadRequest { .. }));
    }

    #[test]
    fn patch_tells_null_from_absent() {
        let p: PatchBody = parse_body(br#"{"behalf_of_user_id":null}"#).unwrap();
        assert_eq!(p.behalf_of_user_id, Some(None));
        let p: PatchBody = parse_body(br#"{}"#).unwrap();
        assert_eq!(p.behalf_of_user_id, None);
    }

    #[test]
    fn patch_refuses_null_lists_and_create_reads_them_as_none() {
        for field in ["scope_names", "allow_ips"] {
            let body = format!(r#"{{"name":"renamed","{field}":null}}"#);
            let e = parse_body::<PatchBody>(body.as_bytes()).unwrap_err();
            assert!(
                matches!(&e, AdminError::BadRequest { field: f, .. } if f == field),
                "{e:?}"
            );
            let body = format!(r#"{{"{field}":[]}}"#);
            let p: PatchBody = parse_body(body.as_bytes()).unwrap();
            assert_eq!(
                p.scope_names.or(p.allow_ips),
                Some(vec![]),
                "[] still clears"
            );
            let body = format!(r#"{{"key_type":"shared","{field}":null}}"#);
            let c: CreateBody = parse_body(body.as_bytes()).unwrap();
            assert_eq!(c.scope_names.or(c.allow_ips), Some(vec![]));
        }
    }

    #[test]
    fn expires_in_forms() {
        let b: CreateBody = parse_body(br#"{"key_type":"shared","expires_in":"30d"}"#).unwrap();
        assert_eq!(b.expires_in, Some(Duration::from_secs(30 * 86400)));
        let b: CreateBody = parse_body(br#"{"key_type":"shared","expires_in":3600}"#).unwrap();
        assert_eq!(b.expires_in, Some(Duration::from_secs(3600)));
        assert!(parse_body::<CreateBody>(br#"{"key_type":"shared","expires_in":-5}"#).is_err());
    }

    #[test]
    fn query_rules() {
        let q = Query::parse(Some("perPage=5&is_enabled=false")).unwrap();
        assert_eq!(q.u32_in(&["per_page", "perPage"], 20, 100).unwrap(), 5);
        assert_eq!(q.bool("is_enabled").unwrap(), Some(false));
        assert!(Query::parse(Some("page=1&page=2")).is_err());
        let q = Query::parse(Some("page=0")).unwrap();
        assert!(q.u32_in(&["page"], 1, 1000).is_err());
    }

    /// `per_page=5&perPage=50` once took `per_page` and ignored the other.
    #[test]
    fn a_parameter_and_its_alias_together_are_refused() {
        let q = Query::parse(Some("per_page=5&perPage=50")).unwrap();
        let e = q.u32_in(&["per_page", "perPage"], 20, 100).unwrap_err();
        assert!(
            matches!(&e, AdminError::BadRequest { field, message }
                if field == "perPage" && message.contains("per_page")),
            "{e:?}"
        );
        let q = Query::parse(Some("per_page=5")).unwrap();
        assert_eq!(q.u32_in(&["per_page", "perPage"], 20, 100).unwrap(), 5);
    }

    /// `{"metadata":{"a":"1","a":"2"}}` once stored `a: 2`.
    #[test]
    fn metadata_refuses_a_key_given_twice() {
        let named_twice = |e: AdminError| {
            assert!(
                matches!(&e, AdminError::BadRequest { field, message }
                    if field.starts_with("metadata") && message.contains("\"a\"")),
                "{e:?}"
            );
        };
        named_twice(
            parse_body::<CreateBody>(
                br#"{"key_type":"shared","metadata":{"a":"1","b":"2","a":"3"}}"#,
            )
            .unwrap_err(),
        );
        named_twice(parse_body::<PatchBody>(br#"{"metadata":{"a":"1","a":"1"}}"#).unwrap_err());
        let p: PatchBody = parse_body(br#"{"metadata":null}"#).unwrap();
        assert_eq!(p.metadata, None);
        let p: PatchBody = parse_body(br#"{"metadata":{"a":"1","b":"2"}}"#).unwrap();
        assert_eq!(p.metadata.unwrap().len(), 2);
        assert!(parse_body::<PatchBody>(br#"{"metadata":{"a":1}}"#).is_err());
    }

    proptest! {
        #[test]
        fn bodies_never_panic(s in "\\PC{0,200}") {
            let _ = parse_body::<CreateBody>(s.as_bytes());
            let _ = parse_body::<PatchBody>(s.as_bytes());
        }

        #[test]
        fn queries_never_panic(s in "\\PC{0,100}") {
            if let Ok(q) = Query::parse(Some(&s)) {
                let _ = q.u32_in(&["page"], 1, 100);
                let _ = q.time("since");
                let _ = q.bool("is_enabled");
            }
        }
    }
}
