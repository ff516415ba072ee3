//! Keyset paging of the big lists (`GET /v1/vms`, `GET /v1/hosts`).
//!
//! A list is ordered by name, and a page token says where the previous page
//! ended: the last name it held. The next page is the matching items with
//! a greater name, so paging is stable under change: an item created or
//! deleted meanwhile never makes another appear twice or go missing, and a
//! token whose last item has since been deleted still works (the page
//! starts after that name). The token is opaque to callers: base64url of
//! JSON `{"list": "vms", "after": "<name>", "filters": "<hash>"}`, where the
//! hash (SHA-256, hex, of the query's filters as JSON) ties it to the
//! filters it was given with, so a token used on another list or with
//! other filters is refused rather than silently answering something else.

use crate::error::Result;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use kumo_api::ApiError;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::ops::Bound;

/// Which list a page token belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum List {
    Vms,
    Hosts,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Token {
    list: List,
    after: String,
    filters: String,
}

/// Where one page starts and how long it is, from a list query.
#[derive(Debug)]
pub struct Pager {
    list: List,
    limit: Option<usize>,
    after: Option<String>,
    filters: String,
}

impl Pager {
    /// Check the query's paging: `token` must be a page token of `list`
    /// given with the same `filters` (the query's filter fields, as one
    /// serializable value). Errors: invalid input naming `page_token`.
    pub fn new(
        list: List,
        limit: Option<u32>,
        token: Option<&str>,
        filters: &impl Serialize,
    ) -> Result<Pager> {
        let filters =
            super::sha256_hex(&serde_json::to_string(filters).expect("list filters serialize"));
        let after = match token {
            None => None,
            Some(token) => {
                let refuse = |why: &str| ApiError::invalid("page_token", why);
                let t: Token = URL_SAFE_NO_PAD
                    .decode(token)
                    .ok()
                    .and_then(|json| serde_json::from_slice(&json).ok())
                    .ok_or_else(|| refuse("is not a page token; pass the `next` of a page"))?;
                if t.list != list {
                    return Err(refuse("is a page token of another list").into());
                }
                if t.filters != filters {
                    return Err(refuse(
                        "was given with other filters; ask for the first page again",
                    )
                    .into());
                }
                Some(t.after)
            }
        };
        Ok(Pager {
            list,
            limit: limit.map(|l| l as usize),
            after,
            filters,
        })
    }

    /// The page of `map` (keyed by name): the views `view` makes of the
    /// items after the token whose name starts with `prefix` (the views it
    /// returns `None` for are left out), at most `limit` of them, and the
    /// token of the page after it if any item is left.
    pub fn page<'a, T, U>(
        &self,
        map: &'a BTreeMap<String, T>,
        prefix: Option<&str>,
        mut view: impl FnMut(&'a T) -> Option<U>,
    ) -> (Vec<U>, Option<String>) {
        let prefix = prefix.unwrap_or("");
        let start = match self.after.as_deref() {
            Some(after) if after >= prefix => Bound::Excluded(after),
            _ => Bound::Included(prefix),
        };
        let limit = self.limit.unwrap_or(usize::MAX);
        let mut items = Vec::new();
        let mut last = "";
        for (name, item) in map.range::<str, _>((start, Bound::Unbounded)) {
            if !name.starts_with(prefix) {
                break;
            }
            let Some(v) = view(item) else { continue };
            if items.len() == limit {
                return (items, Some(self.token_after(last)));
            }
            items.push(v);
            last = name;
        }
        (items, None)
    }

    fn token_after(&self, name: &str) -> String {
        let token = Token {
            list: self.list,
            after: name.to_string(),
            filters: self.filters.clone(),
        };
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(&token).expect("page tokens serialize"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn field(e: crate::Error) -> Option<String> {
        match e {
            crate::Error::Api(a) => a.field,
            other => panic!("{other}"),
        }
    }

    #[test]
    fn pages_walk_every_match_once_and_tokens_are_bound_to_list_and_filters() {
        let map: BTreeMap<String, u32> = (0..50).map(|i| (format!("vm-{i:02}"), i)).collect();
        let filters = json!({"even": true});
        let even = |n: &u32| (n % 2 == 0).then_some(*n);
        let mut seen = Vec::new();
        let mut token = None;
        loop {
            let pager = Pager::new(List::Vms, Some(7), token.as_deref(), &filters).unwrap();
            let (items, next) = pager.page(&map, Some("vm-"), even);
            assert!(items.len() <= 7);
            seen.extend(items);
            match next {
                Some(t) => token = Some(t),
                None => break,
            }
        }
        assert_eq!(seen, (0..50).step_by(2).collect::<Vec<_>>());

        // A token from the first page, refused elsewhere.
        let first = Pager::new(List::Vms, Some(1), None, &filters).unwrap();
        let (_, next) = first.page(&map, None, even);
        let t = next.unwrap();
        let other_list = Pager::new(List::Hosts, None, Some(&t), &filters).unwrap_err();
        assert_eq!(field(other_list).as_deref(), Some("page_token"));
        let other_filter = Pager::new(List::Vms, None, Some(&t), &json!({"even": false}));
        assert_eq!(
            field(other_filter.unwrap_err()).as_deref(),
            Some("page_token")
        );
        for bad in ["", "%%%", "bm90IGpzb24", &t[1..]] {
            let e = Pager::new(List::Vms, None, Some(bad), &filters).unwrap_err();
            assert_eq!(field(e).as_deref(), Some("page_token"), "{bad:?}");
        }

        // Stale: the page's last item is gone, the walk goes on after it.
        let mut map = map;
        map.remove("vm-00");
        let pager = Pager::new(List::Vms, Some(2), Some(&t), &filters).unwrap();
        assert_eq!(pager.page(&map, None, even).0, [2, 4]);
    }
}
