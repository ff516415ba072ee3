//! A thin typed client for the kumo API, used by the CLI and the tests.

use kumo_api::*;
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::path::Path;

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The controller answered with an error.
    #[error("{0}")]
    Api(ApiError),
    /// Nothing at `url` answers as a kumo controller: the saved URL is
    /// wrong, or the controller is not running there (any more).
    #[error("no kumo controller answers at {url}")]
    NotKumo {
        url: String,
        #[source]
        why: NotKumo,
    },
    /// A kumo controller was reached, but the exchange broke off or its
    /// reply could not be read.
    #[error("talking to the controller at {url}")]
    Http {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("reading {path}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Why an address does not count as a kumo controller.
#[derive(Debug, thiserror::Error)]
pub enum NotKumo {
    /// Nothing listens on the port.
    #[error("connection refused")]
    Refused,
    /// No connection within [`CONNECT_TIMEOUT`] (the address is gone, or
    /// a firewall drops the packets).
    #[error("no connection within {} s", CONNECT_TIMEOUT.as_secs())]
    ConnectTimeout,
    /// The connection failed otherwise (no route, unknown name, TLS).
    #[error("cannot connect")]
    Connect(#[source] reqwest::Error),
    /// Something answered, but not as kumo does: an error status without
    /// kumo's JSON error body (another web server's 404 page, a proxy's
    /// 502), or a success that is not JSON.
    #[error("HTTP {status} ({}) is not a kumo reply", content_type.as_deref().unwrap_or("no content type"))]
    Reply {
        status: StatusCode,
        content_type: Option<String>,
    },
}

/// How long a connection to the controller may take to open.
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

impl Error {
    /// The API error code, if the controller answered with one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Error::Api(e) => Some(e.code),
            _ => None,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The page size the client walks lists with: large enough that a walk
/// of 100,000 VMs is 100 requests, small enough that one page is a few
/// milliseconds of the controller's time.
pub const PAGE: u32 = 1000;

/// A name as one URL path segment: anything but unreserved characters is
/// percent-encoded, so a name can never reach another endpoint.
fn segment(name: &str) -> String {
    name.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A reply's media type, without parameters (`application/json`).
fn content_type(resp: &reqwest::Response) -> Option<&str> {
    let value = resp.headers().get(reqwest::header::CONTENT_TYPE)?;
    let media = value.to_str().ok()?.split(';').next()?.trim();
    Some(media)
}

#[derive(Clone)]
pub struct Client {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl Client {
    pub fn new(base: &str, token: &str) -> Client {
        Client {
            base: base.trim_end_matches('/').to_string(),
            token: token.to_string(),
            http: reqwest::Client::builder()
                .connect_timeout(CONNECT_TIMEOUT)
                .build()
                .expect("http client"),
        }
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token)
    }

    /// A failure of `reqwest`: one to connect means no kumo controller
    /// answers at the URL; any later one is an exchange broken off.
    fn transport(&self, source: reqwest::Error) -> Error {
        if !source.is_connect() {
            return Error::Http {
                url: self.base.clone(),
                source,
            };
        }
        let refused =
            std::iter::successors(Some(&source as &(dyn std::error::Error + 'static)), |e| {
                e.source()
            })
            .filter_map(|e| e.downcast_ref::<std::io::Error>())
            .any(|e| e.kind() == std::io::ErrorKind::ConnectionRefused);
        let why = if refused {
            NotKumo::Refused
        } else if source.is_timeout() {
            NotKumo::ConnectTimeout
        } else {
            NotKumo::Connect(source)
        };
        self.not_kumo(why)
    }

    fn not_kumo(&self, why: NotKumo) -> Error {
        Error::NotKumo {
            url: self.base.clone(),
            why,
        }
    }

    /// What a reply that is not kumo's says about itself.
    fn foreign(&self, resp: &reqwest::Response) -> Error {
        self.not_kumo(NotKumo::Reply {
            status: resp.status(),
            content_type: content_type(resp).map(str::to_string),
        })
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Result<reqwest::Response> {
        let resp = req.send().await.map_err(|e| self.transport(e))?;
        if resp.status().is_success() || resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            return Ok(resp);
        }
        let foreign = self.foreign(&resp);
        let text = resp.text().await.map_err(|e| self.transport(e))?;
        // Every error kumo answers carries its JSON error body; anything
        // else came from something that is not kumo.
        match serde_json::from_str(&text) {
            Ok(e) => Err(Error::Api(e)),
            Err(_) => Err(foreign),
        }
    }

    async fn json<T: DeserializeOwned>(&self, req: reqwest::RequestBuilder) -> Result<T> {
        let resp = self.send(req).await?;
        if content_type(&resp) != Some("application/json") {
            return Err(self.foreign(&resp));
        }
        resp.json().await.map_err(|e| self.transport(e))
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.json(self.request(Method::GET, path)).await
    }

    async fn post<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T> {
        self.json(self.request(Method::POST, path).json(body)).await
    }

    /// A POST to an action that takes no body (the server refuses one).
    async fn post_empty<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.json(self.request(Method::POST, path)).await
    }

    /// Every item of a paged list (`{"items": [...], "next": "<token>"}`):
    /// asks for pages of [`PAGE`] with `filters` (a list query whose `limit`
    /// and `page_token` are unset) until an answer has no `next`.
    async fn all_pages<T: DeserializeOwned, F: Serialize>(
        &self,
        path: &str,
        filters: &F,
    ) -> Result<Vec<T>> {
        #[derive(serde::Deserialize)]
        struct Page<T> {
            items: Vec<T>,
            next: Option<String>,
        }
        let mut all = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut req = self
                .request(Method::GET, path)
                .query(filters)
                .query(&[("limit", PAGE)]);
            if let Some(t) = &token {
                req = req.query(&[("page_token", t)]);
            }
            let page: Page<T> = self.json(req).await?;
            all.extend(page.items);
            match page.next {
                Some(next) => token = Some(next),
                None => return Ok(all),
            }
        }
    }

    async fn delete(&self, path: &str) -> Result<()> {
        self.send(self.request(Method::DELETE, path))
            .await
            .map(drop)
    }

    pub async fn zones(&self) -> Result<Vec<Zone>> {
        self.get("/v1/zones").await
    }

    pub async fn zone(&self, name: &str) -> Result<Zone> {
        self.get(&format!("/v1/zones/{}", segment(name))).await
    }

    pub async fn zone_create(&self, req: &CreateZone) -> Result<Zone> {
        self.post("/v1/zones", req).await
    }

    pub async fn zone_delete(&self, name: &str) -> Result<()> {
        self.delete(&format!("/v1/zones/{}", segment(name))).await
    }

    /// A zone's power saving: settings, standby hosts, energy saved.
    pub async fn zone_power_saving(&self, name: &str) -> Result<PowerSavingStatus> {
        self.get(&format!("/v1/zones/{}/power-saving", segment(name)))
            .await
    }

    /// Turn power saving on for a zone (or change its settings).
    pub async fn zone_power_saving_set(&self, name: &str, req: &PowerSaving) -> Result<Zone> {
        let path = format!("/v1/zones/{}/power-saving", segment(name));
        self.json(self.request(Method::PUT, &path).json(req)).await
    }

    /// Turn power saving off; the zone's standby hosts are switched on.
    pub async fn zone_power_saving_off(&self, name: &str) -> Result<Zone> {
        let path = format!("/v1/zones/{}/power-saving", segment(name));
        self.json(self.request(Method::DELETE, &path)).await
    }

    /// Automatic rebalancing: settings and its last pass.
    pub async fn rebalance_status(&self) -> Result<RebalanceStatus> {
        self.get("/v1/rebalance").await
    }

    pub async fn groups(&self) -> Result<Vec<Group>> {
        self.get("/v1/groups").await
    }

    pub async fn group(&self, name: &str) -> Result<Group> {
        self.get(&format!("/v1/groups/{}", segment(name))).await
    }

    pub async fn group_create(&self, req: &CreateGroup) -> Result<Group> {
        self.post("/v1/groups", req).await
    }

    pub async fn group_delete(&self, name: &str) -> Result<()> {
        self.delete(&format!("/v1/groups/{}", segment(name))).await
    }

    pub async fn hosts(&self) -> Result<Vec<Host>> {
        self.hosts_where(&HostListQuery::default()).await
    }

    /// Every host matching the query's filters, fetched page by page (its
    /// `limit` and `page_token` are ignored).
    pub async fn hosts_where(&self, q: &HostListQuery) -> Result<Vec<Host>> {
        let filters = HostListQuery {
            limit: None,
            page_token: None,
            ..q.clone()
        };
        self.all_pages("/v1/hosts", &filters).await
    }

    pub async fn host(&self, name: &str) -> Result<Host> {
        self.get(&format!("/v1/hosts/{}", segment(name))).await
    }

    pub async fn host_enable(&self, name: &str, enabled: bool) -> Result<Host> {
        let verb = if enabled { "enable" } else { "disable" };
        self.post_empty(&format!("/v1/hosts/{}/{verb}", segment(name)))
            .await
    }

    pub async fn host_delete(&self, name: &str) -> Result<()> {
        self.delete(&format!("/v1/hosts/{}", segment(name))).await
    }

    /// Drain a host (or with `dry_run` only plan it): where its VMs go.
    pub async fn host_drain(&self, name: &str, dry_run: bool) -> Result<DrainPlan> {
        self.drain(&format!("/v1/hosts/{}/drain", segment(name)), dry_run)
            .await
    }

    /// Take a drained host back; with `return_vms` its VMs come back too.
    pub async fn host_undrain(&self, name: &str, return_vms: bool) -> Result<Host> {
        self.undrain(&format!("/v1/hosts/{}/undrain", segment(name)), return_vms)
            .await
    }

    /// Drain every host of a zone (or with `dry_run` only plan it).
    pub async fn zone_drain(&self, name: &str, dry_run: bool) -> Result<DrainPlan> {
        self.drain(&format!("/v1/zones/{}/drain", segment(name)), dry_run)
            .await
    }

    /// What a zone's drain still has to move.
    pub async fn zone_drain_status(&self, name: &str) -> Result<DrainPlan> {
        self.get(&format!("/v1/zones/{}/drain", segment(name)))
            .await
    }

    /// Take a zone's drained hosts back; with `return_vms` the VMs come
    /// back to the hosts they left.
    pub async fn zone_undrain(&self, name: &str, return_vms: bool) -> Result<Vec<Host>> {
        self.undrain(&format!("/v1/zones/{}/undrain", segment(name)), return_vms)
            .await
    }

    async fn drain(&self, path: &str, dry_run: bool) -> Result<DrainPlan> {
        self.json(
            self.request(Method::POST, path)
                .query(&[("dry_run", dry_run)]),
        )
        .await
    }

    async fn undrain<T: DeserializeOwned>(&self, path: &str, return_vms: bool) -> Result<T> {
        self.json(
            self.request(Method::POST, path)
                .query(&[("return", return_vms)]),
        )
        .await
    }

    pub async fn join_token_create(&self, req: &CreateJoinToken) -> Result<JoinToken> {
        self.post("/v1/join-tokens", req).await
    }

    pub async fn join_tokens(&self) -> Result<Vec<JoinToken>> {
        self.get("/v1/join-tokens").await
    }

    pub async fn images(&self) -> Result<Vec<Image>> {
        self.get("/v1/images").await
    }

    pub async fn image(&self, name: &str) -> Result<Image> {
        self.get(&format!("/v1/images/{}", segment(name))).await
    }

    /// Upload an image file, streamed.
    pub async fn image_import(&self, name: &str, file: &Path) -> Result<Image> {
        let io = |source| Error::Io {
            path: file.display().to_string(),
            source,
        };
        let f = tokio::fs::File::open(file).await.map_err(io)?;
        let len = f.metadata().await.map_err(io)?.len();
        let body = reqwest::Body::from(f);
        let req = self
            .request(Method::POST, "/v1/images")
            .query(&[("name", name)])
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .header(reqwest::header::CONTENT_LENGTH, len)
            .body(body);
        self.json(req).await
    }

    pub async fn image_delete(&self, name: &str) -> Result<()> {
        self.delete(&format!("/v1/images/{}", segment(name))).await
    }

    pub async fn vms(&self) -> Result<Vec<Vm>> {
        self.vms_where(&VmListQuery::default()).await
    }

    /// One page of VMs (see [`VmListQuery`]).
    pub async fn vm_page(&self, q: &VmListQuery) -> Result<VmList> {
        self.json(self.request(Method::GET, "/v1/vms").query(q))
            .await
    }

    /// Every VM matching the query's filters, fetched page by page (its
    /// `limit` and `page_token` are ignored).
    pub async fn vms_where(&self, q: &VmListQuery) -> Result<Vec<Vm>> {
        let filters = VmListQuery {
            limit: None,
            page_token: None,
            ..q.clone()
        };
        self.all_pages("/v1/vms", &filters).await
    }

    pub async fn vm(&self, name: &str) -> Result<Vm> {
        self.get(&format!("/v1/vms/{}", segment(name))).await
    }

    pub async fn vm_create(&self, req: &CreateVm) -> Result<Vm> {
        self.post("/v1/vms", req).await
    }

    /// `start`, `stop` or `reboot`.
    pub async fn vm_action(&self, name: &str, action: &str) -> Result<Vm> {
        self.post_empty(&format!("/v1/vms/{}/{action}", segment(name)))
            .await
    }

    pub async fn vm_migrate(&self, name: &str, req: &MigrateVm) -> Result<Vm> {
        self.post(&format!("/v1/vms/{}/migrate", segment(name)), req)
            .await
    }

    pub async fn vm_migrate_cancel(&self, name: &str) -> Result<Vm> {
        self.post_empty(&format!("/v1/vms/{}/migrate/cancel", segment(name)))
            .await
    }

    pub async fn vm_delete(&self, name: &str) -> Result<Vm> {
        self.json(self.request(Method::DELETE, &format!("/v1/vms/{}", segment(name))))
            .await
    }

    pub async fn console_log(&self, name: &str) -> Result<ConsoleLog> {
        self.get(&format!("/v1/vms/{}/console/log", segment(name)))
            .await
    }

    /// The interactive serial console as a raw byte stream.
    pub async fn console(&self, name: &str) -> Result<reqwest::Upgraded> {
        let req = self
            .request(Method::GET, &format!("/v1/vms/{}/console", segment(name)))
            .header(reqwest::header::CONNECTION, "upgrade")
            .header(reqwest::header::UPGRADE, "kumo-console");
        let resp = self.send(req).await?;
        resp.upgrade().await.map_err(|e| self.transport(e))
    }

    pub async fn capacity(&self, q: &CapacityQuery) -> Result<CapacityReport> {
        let mut req = self.request(Method::GET, "/v1/capacity").query(&[
            ("vcpus", q.vcpus.to_string()),
            ("memory_mib", q.memory_mib.to_string()),
            ("disk_gib", q.disk_gib.unwrap_or(1).to_string()),
        ]);
        if let Some(z) = &q.zone {
            req = req.query(&[("zone", z)]);
        }
        if let Some(p) = q.cpu_policy {
            req = req.query(&[(
                "cpu_policy",
                if p == CpuPolicy::Dedicated {
                    "dedicated"
                } else {
                    "shared"
                },
            )]);
        }
        if let Some(r) = &q.requirements {
            req = req.query(&[("requirements", r)]);
        }
        self.json(req).await
    }

    pub async fn host_update(&self, name: &str, req: &UpdateHost) -> Result<Host> {
        self.json(
            self.request(Method::PATCH, &format!("/v1/hosts/{}", segment(name)))
                .json(req),
        )
        .await
    }

    /// One page of the event log (see [`EventQuery`]); with `wait_seconds` the
    /// call waits that long for new events when there are none yet.
    pub async fn events(&self, q: &EventQuery) -> Result<EventPage> {
        self.json(self.request(Method::GET, "/v1/events").query(q))
            .await
    }
}
