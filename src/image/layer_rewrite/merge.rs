//! Merges the lowest layers of an image into one layer tar: what overlayfs would show with those
//! layers stacked, so that an image with more layers than a VM has disk slots still boots.
//!
//! Two streaming passes over the layers, bottom first. The first ([`Merge::apply`]) checks each
//! layer exactly as [`super::rewrite`] does and folds its paths into one tree: a whiteout removes
//! the lower path and all beneath it, an opaque directory removes what the lower layers put
//! beneath it, a non-directory replaces whatever was at its path (a directory with its whole
//! content included), a directory replaces a lower non-directory and otherwise takes over the
//! lower directory's attributes (unless only implied by its children). Only paths and directory
//! attributes are kept, not file data. The second ([`MergeWriter`]) reads the layers again and
//! writes each surviving non-directory from the layer that provides it, then every directory.
//! Nothing lies below the merged bottom, so no whiteouts or opaque markers are written.
//!
//! Hard links stay confined to their layer. When a higher layer removes or replaces a link's
//! target but the link itself survives, the target's data is written at the first surviving link
//! of it (its "heir"), and the layer's other surviving links to it name the heir: each survivor
//! keeps the content it had, as overlayfs would show it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{self, Read, Write};

use super::{Meta, RewriteError, Rewriter, Summary, TarWriter};

/// Which non-directories of one layer the merged tar holds, and where.
#[derive(Clone, Debug, Default)]
pub(crate) struct LayerPlan {
    /// Surviving non-directories written at their own path.
    keep: HashSet<Vec<u8>>,
    /// Hidden hard-link targets -> the surviving link that takes their data.
    heirs: HashMap<Vec<u8>, Vec<u8>>,
}

impl LayerPlan {
    /// Where the non-directory `path` is written, if at all.
    pub(super) fn place(&self, path: &[u8]) -> Option<Vec<u8>> {
        if let Some(heir) = self.heirs.get(path) {
            Some(heir.clone())
        } else if self.keep.contains(path) {
            Some(path.to_vec())
        } else {
            None
        }
    }

    /// The path a surviving hard link to `root` (a non-link entry of this layer) names.
    pub(super) fn link_target(&self, root: &[u8]) -> Vec<u8> {
        self.heirs
            .get(root)
            .cloned()
            .unwrap_or_else(|| root.to_vec())
    }
}

#[derive(Debug)]
enum Node {
    /// A directory, with the attributes of the highest layer that gave any.
    Dir(Option<Meta>),
    /// A non-directory, from this layer (index, bottom first).
    File(usize),
}

/// The merged tree of the layers applied so far (first pass).
#[derive(Debug)]
pub(crate) struct Merge {
    tree: BTreeMap<Vec<u8>, Node>,
    /// Per layer: its hard links in order, (path, the non-link entry it names).
    links: Vec<Vec<(Vec<u8>, Vec<u8>)>>,
}

impl Merge {
    /// An empty tree: just the root directory.
    pub(crate) fn new() -> Merge {
        let mut tree = BTreeMap::new();
        tree.insert(Vec::new(), Node::Dir(None));
        Merge {
            tree,
            links: Vec::new(),
        }
    }

    /// Checks the next layer up (its decompressed tar) and stacks it on the tree.
    pub(crate) fn apply<R: Read>(&mut self, input: R) -> Result<(), RewriteError> {
        let layer = self.links.len();
        // An empty plan writes nothing: this pass only checks and records.
        let nothing = LayerPlan::default();
        let mut sink = TarWriter::new(io::sink());
        let mut rw = Rewriter::new(&mut sink, Some(&nothing));
        rw.run(input)?;
        let Rewriter {
            dirs,
            nondirs,
            whiteouts,
            links,
            ..
        } = rw;
        // Whiteouts and opaque directories hide only what lies below this layer, so they go
        // first; the layer's own entries then land on top.
        for w in &whiteouts {
            self.tree.remove(w);
            self.remove_below(w);
        }
        for (path, dir) in &dirs {
            if dir.opaque {
                self.remove_below(path);
            }
        }
        for path in nondirs {
            self.remove_below(&path);
            self.tree.insert(path, Node::File(layer));
        }
        for (path, dir) in dirs {
            match self.tree.get_mut(&path) {
                Some(Node::Dir(meta)) => {
                    if dir.meta.is_some() {
                        *meta = dir.meta;
                    }
                }
                _ => {
                    self.tree.insert(path, Node::Dir(dir.meta));
                }
            }
        }
        self.links.push(links);
        Ok(())
    }

    /// Removes everything beneath `dir` (not `dir` itself).
    fn remove_below(&mut self, dir: &[u8]) {
        let prefix = if dir.is_empty() {
            Vec::new()
        } else {
            [dir, b"/"].concat()
        };
        let below: Vec<Vec<u8>> = self
            .tree
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .filter(|(k, _)| !k.is_empty())
            .map(|(k, _)| k.clone())
            .collect();
        for k in below {
            self.tree.remove(&k);
        }
    }

    /// What the second pass writes from each layer, bottom first.
    pub(crate) fn plans(&self) -> Vec<LayerPlan> {
        let mut plans = vec![LayerPlan::default(); self.links.len()];
        for (path, node) in &self.tree {
            if let Node::File(layer) = node {
                plans[*layer].keep.insert(path.clone());
            }
        }
        for (plan, links) in plans.iter_mut().zip(&self.links) {
            for (path, root) in links {
                if plan.keep.contains(path)
                    && !plan.keep.contains(root)
                    && !plan.heirs.contains_key(root)
                {
                    // The heir is written where its target's data streams by (earlier in the
                    // layer), not at its own entry.
                    plan.keep.remove(path);
                    plan.heirs.insert(root.clone(), path.clone());
                }
            }
        }
        plans
    }
}

/// The second pass: one tar of the merged layers.
pub(crate) struct MergeWriter<W: Write> {
    out: TarWriter<W>,
    summary: Summary,
}

impl<W: Write> MergeWriter<W> {
    /// Writes the merged tar to `output`.
    pub(crate) fn new(output: W) -> Self {
        MergeWriter {
            out: TarWriter::new(output),
            summary: Summary::default(),
        }
    }

    /// Writes the non-directories `plan` picks from the next layer up (its decompressed tar).
    pub(crate) fn layer<R: Read>(
        &mut self,
        input: R,
        plan: &LayerPlan,
    ) -> Result<(), RewriteError> {
        let mut rw = Rewriter::new(&mut self.out, Some(plan));
        rw.run(input)?;
        self.summary.entries += rw.summary.entries;
        self.summary.dropped_overlay_xattrs += rw.summary.dropped_overlay_xattrs;
        Ok(())
    }

    /// Writes the directories (after their content, as tar2sqfs needs) and ends the archive.
    pub(crate) fn finish(mut self, merge: &Merge) -> Result<Summary, RewriteError> {
        for (path, node) in &merge.tree {
            let Node::Dir(meta) = node else { continue };
            if path.is_empty() && meta.is_none() {
                continue; // tar2sqfs makes the root the same way
            }
            // An implied directory is written too: a higher layer may have removed the entries
            // that implied it, yet it exists in the layer image that implied it.
            let meta = meta.clone().unwrap_or(Meta {
                mode: 0o755,
                ..Meta::default()
            });
            let p: &[u8] = if path.is_empty() { b"./" } else { path };
            self.out
                .write(p, tar::EntryType::Directory, &meta, None, (0, 0), 0, None)?;
            self.summary.entries += 1;
        }
        self.out.finish()?;
        Ok(self.summary)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tar::EntryType;

    const F: EntryType = EntryType::Regular;
    const D: EntryType = EntryType::Directory;
    const L: EntryType = EntryType::Link;

    /// A layer tar of (path, type, data or link target).
    fn layer(entries: &[(&str, EntryType, &str)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, kind, body) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*kind);
            h.set_mode(0o644);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            if *kind == L || *kind == EntryType::Symlink {
                h.set_size(0);
                b.append_link(&mut h, path, body).unwrap();
            } else {
                h.set_size(body.len() as u64);
                b.append_data(&mut h, path, body.as_bytes()).unwrap();
            }
        }
        b.into_inner().unwrap()
    }

    /// The merged tar as "TYPE PATH BODY" lines (body: data, or a hard link's target).
    fn merged(layers: &[Vec<u8>]) -> Result<Vec<String>, RewriteError> {
        let mut m = Merge::new();
        for l in layers {
            m.apply(&l[..])?;
        }
        let mut out = Vec::new();
        let mut w = MergeWriter::new(&mut out);
        for (l, plan) in layers.iter().zip(m.plans()) {
            w.layer(&l[..], &plan)?;
        }
        w.finish(&m)?;
        let mut a = tar::Archive::new(&out[..]);
        let mut v = Vec::new();
        for e in a.entries().unwrap() {
            let mut e = e.unwrap();
            let path = String::from_utf8_lossy(&e.path_bytes()).into_owned();
            let t = e.header().entry_type().as_byte() as char;
            let mut body = String::new();
            match e.link_name_bytes() {
                Some(l) => body = String::from_utf8_lossy(&l).into_owned(),
                None => {
                    e.read_to_string(&mut body).unwrap();
                }
            }
            v.push(format!("{t} {path} {body}").trim_end().to_string());
        }
        Ok(v)
    }

    #[test]
    fn a_link_outliving_its_target_takes_the_data() {
        let l0 = layer(&[
            ("f", F, "data"),
            ("g", L, "f"),
            ("h", L, "g"),
            ("x", F, "x"),
            ("y", L, "x"),
        ]);
        let l1 = layer(&[(".wh.f", F, ""), (".wh.x", F, ""), (".wh.y", F, "")]);
        assert_eq!(merged(&[l0, l1]).unwrap(), ["0 g data", "1 h g"]);
    }

    #[test]
    fn replacements_whiteouts_and_opaque_directories_stack() {
        let l0 = layer(&[
            ("a", F, "file"),
            ("d/", D, ""),
            ("d/old", F, "old"),
            ("e/f", F, "f"),
        ]);
        let l1 = layer(&[
            ("a/", D, ""),
            ("a/x", F, "x"),
            ("d/.wh..wh..opq", F, ""),
            ("d/new", F, "new"),
            ("e/.wh.f", F, ""),
        ]);
        let l2 = layer(&[("a", F, "again"), ("d/", D, "")]);
        assert_eq!(
            merged(&[l0, l1, l2]).unwrap(),
            ["0 d/new new", "0 a again", "5 d", "5 e"]
        );
        // An opaque root hides everything below.
        let top = layer(&[(".wh..wh..opq", F, ""), ("only", F, "1")]);
        let l0 = layer(&[("a", F, "file"), ("d/x", F, "")]);
        assert_eq!(merged(&[l0, top]).unwrap(), ["0 only 1"]);
    }

    #[test]
    fn each_merged_layer_is_checked_as_a_single_one() {
        let ok = layer(&[("f", F, "data")]);
        let escape = layer(&[("s", EntryType::Symlink, "/etc"), ("s/x", F, "x")]);
        let err = merged(&[ok.clone(), escape]);
        assert!(
            matches!(&err, Err(RewriteError::Hostile(m)) if m.contains("beneath")),
            "{err:?}"
        );
        // Hard links reach only the same layer, even when merged.
        let across = layer(&[("g", L, "f")]);
        assert!(matches!(
            merged(&[ok, across]),
            Err(RewriteError::Hostile(_))
        ));
    }
}
