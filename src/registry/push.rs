//! `push`: each blob the registry lacks is uploaded (monolithic upload: POST for a session,
//! PUT of the whole blob with its digest), then the manifest, byte for byte as stored so that
//! its digest stays the image's.

use ureq::http::Method;

use super::client::{header, Client, Options, Payload};
use super::reference::Reference;
use super::Error;
use crate::image::{self, BlobRef, Digest, Store};

/// What a push did.
#[derive(Clone, Debug)]
pub struct Pushed {
    /// Where it went.
    pub reference: Reference,
    /// The manifest's digest.
    pub digest: Digest,
    /// The manifest's size.
    pub size: usize,
    /// Blobs uploaded (the others were there already).
    pub uploaded: usize,
}

/// Pushes the stored image `image` (a name or ID) to `dest` (docker's grammar, or
/// `docker://...`), or to the registry its own name says when `dest` is `None`.
pub fn push(
    store: &Store,
    image: &str,
    dest: Option<&str>,
    opts: &Options,
) -> Result<Pushed, Error> {
    let img = store.resolve(image)?;
    let target = dest.unwrap_or(&img.name);
    let r = Reference::parse(target)?;
    let Some(tag) = r.tag.clone().filter(|_| r.digest.is_none()) else {
        return Err(Error::BadReference {
            reference: target.to_string(),
            why: "push to a tag (REPOSITORY:TAG), not a digest".into(),
        });
    };
    let plan = store.push_plan(&img)?;
    let client = Client::for_reference(&r, true, opts)?;
    let mut uploaded = 0;
    for (blob, path) in &plan.blobs {
        if upload(&client, &r, blob, path)? {
            uploaded += 1;
        }
    }
    let what = format!("storing manifest {}:{tag}", r.repository);
    let resp = client.request(
        &Method::PUT,
        &format!("/v2/{}/manifests/{tag}", r.repository),
        &[("content-type", plan.media_type.clone())],
        Payload::Bytes(&plan.manifest),
    )?;
    if !matches!(resp.status().as_u16(), 200 | 201) {
        return Err(client.status_error(resp, &what));
    }
    if let Some(said) = header(&resp, "docker-content-digest") {
        if said.trim() != plan.digest.as_str() {
            return Err(Error::Protocol {
                registry: r.registry.clone(),
                what,
                reason: format!(
                    "the registry stored it as {said}, not {}: it rewrote the manifest",
                    plan.digest
                ),
            });
        }
    }
    Ok(Pushed {
        reference: r,
        digest: plan.digest,
        size: plan.manifest.len(),
        uploaded,
    })
}

/// Uploads `blob` unless the registry has it; true when it was uploaded.
fn upload(
    client: &Client,
    r: &Reference,
    blob: &BlobRef,
    path: &std::path::Path,
) -> Result<bool, Error> {
    let short = image::short_digest(blob.digest.as_str());
    let head = client.request(
        &Method::HEAD,
        &format!("/v2/{}/blobs/{}", r.repository, blob.digest),
        &[],
        Payload::Empty,
    )?;
    match head.status().as_u16() {
        200 => return Ok(false),
        404 => {}
        _ => return Err(client.status_error(head, &format!("checking blob {short}"))),
    }
    let uploads = format!("/v2/{}/blobs/uploads/", r.repository);
    let start = client.request(
        &Method::POST,
        &uploads,
        &[("content-length", "0".to_string())],
        Payload::Empty,
    )?;
    if start.status().as_u16() != 202 {
        return Err(client.status_error(start, &format!("starting the upload of blob {short}")));
    }
    let location = header(&start, "location").ok_or_else(|| Error::Protocol {
        registry: r.registry.clone(),
        what: format!("starting the upload of blob {short}"),
        reason: "the answer has no Location".into(),
    })?;
    let location = client.resolve_from(&uploads, &location)?;
    let sep = if location.contains('?') { '&' } else { '?' };
    let url = format!(
        "{location}{sep}digest={}",
        blob.digest.as_str().replace(':', "%3A")
    );
    let put = client.request(
        &Method::PUT,
        &url,
        &[("content-type", "application/octet-stream".to_string())],
        Payload::File(path),
    )?;
    if put.status().as_u16() != 201 {
        return Err(client.status_error(put, &format!("uploading blob {short}")));
    }
    Ok(true)
}
