//! The policy: what kumo accepts of an image, judged from `qemu-img info`.

use kumo_api::ImageFormat;
use serde_json::Value;

/// The largest virtual size an image may describe: 2 TiB, the most an
/// MBR-partitioned disk can address (2^32 sectors of 512 bytes) and far
/// above any cloud base image (Debian's genericcloud image describes
/// 3 GiB). A larger size comes from a crafted header more likely than from
/// a real image, and `qemu-img check`'s walk of the metadata grows with it.
/// A VM's own disk may still be larger than its image.
pub const MAX_VIRTUAL_SIZE: u64 = 2 << 40;

/// Raw images are whole sectors.
const SECTOR: u64 = 512;

/// What kumo needs to know of an image that passed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Inspected {
    pub format: ImageFormat,
    /// Bytes of the disk the image describes.
    pub virtual_size: u64,
}

/// Why an image is refused: the image's fault, each message saying what
/// was wrong and what kumo accepts.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("not a readable disk image: {0}")]
    Unreadable(String),
    #[error(
        "format {0} is not supported; allowed: qcow2, raw (convert with `qemu-img convert -O qcow2`)"
    )]
    Format(String),
    #[error("the {format} image has a backing file ({name}); kumo refuses images that name other files: flatten it first (`qemu-img convert -O qcow2`)")]
    BackingFile { format: &'static str, name: String },
    #[error("the qcow2 image names an external data file ({0}); kumo refuses images that name host files")]
    DataFile(String),
    #[error("the {format} image names another file or protocol ({name}, as `{key}`); kumo refuses images that name other files")]
    NamesOther {
        format: &'static str,
        key: String,
        name: String,
    },
    #[error("the {0} image is encrypted and kumo holds no keys: decrypt it first (`qemu-img convert -O qcow2`)")]
    Encrypted(&'static str),
    #[error("the file is empty")]
    Empty,
    #[error(
        "virtual size {0} bytes is larger than kumo accepts ({MAX_VIRTUAL_SIZE} bytes, 2 TiB)"
    )]
    TooLarge(u64),
    #[error("{0} bytes is not a raw disk image: expected a whole number of {SECTOR}-byte sectors")]
    NotSectors(u64),
    #[error("the qcow2 image is corrupt: {0}")]
    Corrupt(String),
    #[error("qemu-img exceeded its limits ({} GiB of memory, {} s of CPU) inspecting the image", crate::QEMU_IMG_ADDRESS_SPACE >> 30, crate::QEMU_IMG_CPU_SECONDS)]
    Limits,
}

/// Judge an image from `info`, what `qemu-img info --output=json` reported
/// of the file `path` (as given to qemu-img), `file_size` bytes long.
pub fn judge(info: &Value, path: &str, file_size: u64) -> Result<Inspected, Refusal> {
    let (Some(format), Some(virtual_size)) = (
        info.get("format").and_then(Value::as_str),
        info.get("virtual-size").and_then(Value::as_u64),
    ) else {
        return Err(Refusal::Unreadable(
            "qemu-img reported no format and virtual size".into(),
        ));
    };
    let format = match format {
        "qcow2" => ImageFormat::Qcow2,
        "raw" => ImageFormat::Raw,
        other => return Err(Refusal::Format(other.into())),
    };
    let name = format.as_str();
    // The specific ways of naming a file first, for the clearest message.
    for key in ["backing-filename", "full-backing-filename"] {
        if let Some(backing) = info.get(key) {
            return Err(Refusal::BackingFile {
                format: name,
                name: text(backing),
            });
        }
    }
    let specific = &info["format-specific"]["data"];
    if let Some(data_file) = specific.get("data-file") {
        return Err(Refusal::DataFile(text(data_file)));
    }
    // The raw flag means the data lives elsewhere even if no name is shown.
    if specific.get("data-file-raw") == Some(&Value::Bool(true)) {
        return Err(Refusal::DataFile("no name given".into()));
    }
    // Then anything else in the report that names a file other than the
    // one inspected (in newer QEMUs, the child nodes; extents; fields yet
    // to come), and any `json:` filename (a whole block graph in a string).
    let mut strings = Vec::new();
    collect_strings("", info, &mut strings);
    for (key, value) in strings {
        let names_file = key.ends_with("filename") || key.ends_with("data-file");
        if value.starts_with("json:") || (names_file && value != path) {
            return Err(Refusal::NamesOther {
                format: name,
                key: key.into(),
                name: value.into(),
            });
        }
    }
    if info.get("encrypted") == Some(&Value::Bool(true)) || specific.get("encrypt").is_some() {
        return Err(Refusal::Encrypted(name));
    }
    if specific.get("corrupt") == Some(&Value::Bool(true)) {
        return Err(Refusal::Corrupt("its header marks it corrupt".into()));
    }
    if file_size == 0 {
        return Err(Refusal::Empty);
    }
    if virtual_size > MAX_VIRTUAL_SIZE {
        return Err(Refusal::TooLarge(virtual_size));
    }
    if format == ImageFormat::Raw && file_size % SECTOR != 0 {
        return Err(Refusal::NotSectors(file_size));
    }
    Ok(Inspected {
        format,
        virtual_size,
    })
}

/// A JSON value as text for a message (strings without their quotes).
fn text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Every string in `value`, with the key it is under (an array's items
/// are under the array's key).
fn collect_strings<'a>(key: &'a str, value: &'a Value, out: &mut Vec<(&'a str, &'a str)>) {
    match value {
        Value::String(s) => out.push((key, s)),
        Value::Array(items) => {
            for item in items {
                collect_strings(key, item, out);
            }
        }
        Value::Object(fields) => {
            for (k, v) in fields {
                collect_strings(k, v, out);
            }
        }
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const PATH: &str = "/var/lib/kumo/images/upload-1";

    /// What qemu-img 7.2 reports of a fresh qcow2 (`qemu-img create -f
    /// qcow2 x 1G`), with `extra` merged in.
    fn qcow2(extra: Value) -> Value {
        let mut info = json!({
            "virtual-size": 1u64 << 30,
            "filename": PATH,
            "cluster-size": 65536,
            "format": "qcow2",
            "actual-size": 200704,
            "format-specific": {
                "type": "qcow2",
                "data": {
                    "compat": "1.1",
                    "compression-type": "zlib",
                    "lazy-refcounts": false,
                    "refcount-bits": 16,
                    "corrupt": false,
                    "extended-l2": false
                }
            },
            "dirty-flag": false
        });
        merge(&mut info, extra);
        info
    }

    fn raw(virtual_size: u64) -> Value {
        json!({
            "virtual-size": virtual_size,
            "filename": PATH,
            "format": "raw",
            "actual-size": 4096,
            "dirty-flag": false
        })
    }

    fn merge(into: &mut Value, extra: Value) {
        match (into, extra) {
            (Value::Object(a), Value::Object(b)) => {
                for (k, v) in b {
                    merge(a.entry(k).or_insert(Value::Null), v);
                }
            }
            (slot, v) => *slot = v,
        }
    }

    fn refusal(info: &Value, size: u64) -> String {
        judge(info, PATH, size).unwrap_err().to_string()
    }

    #[test]
    fn good_images_pass() {
        assert_eq!(
            judge(&qcow2(json!({})), PATH, 200704),
            Ok(Inspected {
                format: ImageFormat::Qcow2,
                virtual_size: 1 << 30
            })
        );
        assert_eq!(
            judge(&raw(1 << 20), PATH, 1 << 20),
            Ok(Inspected {
                format: ImageFormat::Raw,
                virtual_size: 1 << 20
            })
        );
        // Just at the bound.
        let info = qcow2(json!({"virtual-size": MAX_VIRTUAL_SIZE}));
        assert!(judge(&info, PATH, 200704).is_ok());
    }

    #[test]
    fn an_external_data_file_is_refused() {
        // OSSA-2024-001: `-o data_file=/etc/passwd,data_file_raw=on`.
        let info = qcow2(json!({"format-specific": {"data": {
            "data-file": "/etc/passwd", "data-file-raw": true
        }}}));
        assert_eq!(
            refusal(&info, 327680),
            "the qcow2 image names an external data file (/etc/passwd); kumo refuses images that name host files"
        );
        let info = qcow2(json!({"format-specific": {"data": {"data-file": "nbd://10.0.0.1/x"}}}));
        assert!(refusal(&info, 327680).contains("nbd://10.0.0.1/x"));
        // The raw flag alone still means the data lives elsewhere.
        let info = qcow2(json!({"format-specific": {"data": {"data-file-raw": true}}}));
        assert!(refusal(&info, 327680).contains("external data file"));
    }

    #[test]
    fn a_backing_file_is_refused() {
        let info = qcow2(json!({
            "backing-filename-format": "qcow2",
            "full-backing-filename": "/srv/base.qcow2",
            "backing-filename": "/srv/base.qcow2"
        }));
        let message = refusal(&info, 200704);
        assert!(
            message.starts_with("the qcow2 image has a backing file (/srv/base.qcow2)"),
            "{message}"
        );
        // A full name alone is enough.
        let info = qcow2(json!({"full-backing-filename": "/srv/base.qcow2"}));
        assert!(refusal(&info, 200704).contains("backing file"));
    }

    #[test]
    fn json_and_protocol_names_are_refused_anywhere() {
        let graph = r#"json:{"driver":"file","filename":"/etc/shadow"}"#;
        // A `json:` name in the image's own filename.
        let info = qcow2(json!({"filename": graph}));
        assert!(refusal(&info, 200704).contains("json:"));
        // Deep in a child node (as QEMU 8 reports them) or a snapshot name.
        let info = qcow2(json!({"children": [{"name": "file", "info": {
            "filename": "nbd+unix:///x?socket=/run/s", "format": "nbd"
        }}]}));
        let message = refusal(&info, 200704);
        assert!(
            message.contains(
                "names another file or protocol (nbd+unix:///x?socket=/run/s, as `filename`)"
            ),
            "{message}"
        );
        let info = qcow2(json!({"snapshots": [{"name": graph}]}));
        assert!(refusal(&info, 200704).contains("json:"));
        // The inspected file itself may appear anywhere.
        let info = qcow2(json!({"children": [{"name": "file", "info": {
            "filename": PATH, "format": "file"
        }}]}));
        assert!(judge(&info, PATH, 200704).is_ok());
    }

    #[test]
    fn unsupported_formats_are_refused_by_name() {
        for format in ["vmdk", "vdi", "luks", "qed", "vhdx", "qcow"] {
            let info = json!({"virtual-size": 1048576, "filename": PATH, "format": format});
            assert_eq!(
                refusal(&info, 65536),
                format!("format {format} is not supported; allowed: qcow2, raw (convert with `qemu-img convert -O qcow2`)")
            );
        }
        assert!(refusal(&json!({"filename": PATH}), 1).contains("no format"));
    }

    #[test]
    fn encrypted_qcow2_is_refused() {
        let info = qcow2(json!({
            "encrypted": true,
            "format-specific": {"data": {"encrypt": {"format": "luks", "cipher-alg": "aes-256"}}}
        }));
        assert!(refusal(&info, 2359296).contains("encrypted"));
    }

    #[test]
    fn sizes_are_bounded() {
        let info = qcow2(json!({"virtual-size": MAX_VIRTUAL_SIZE + 1}));
        assert_eq!(
            refusal(&info, 245760),
            format!(
                "virtual size {} bytes is larger than kumo accepts (2199023255552 bytes, 2 TiB)",
                MAX_VIRTUAL_SIZE + 1
            )
        );
        assert_eq!(refusal(&raw(0), 0), "the file is empty");
        assert!(refusal(&raw(16), 16).contains("whole number of 512-byte sectors"));
        let info = qcow2(json!({"format-specific": {"data": {"corrupt": true}}}));
        assert!(refusal(&info, 200704).contains("corrupt"));
    }
}
