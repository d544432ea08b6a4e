//! Control vectors: per-layer directions in the model's hidden space, one
//! set per mood quadrant, that the engine adds to layer outputs to steer
//! generation with the emotional state. Pure: the contrastive pairs, the
//! reduction of hidden states to calibrated directions, the blend, and
//! llama.cpp's control-vector GGUF format (read and write).
//!
//! Each quadrant's set is one file in llama.cpp's format (`direction.N`
//! f32 tensors of `n_embd` for layers N >= 1, `controlvector.model_hint`,
//! `controlvector.layer_count`), so `llama-cli --control-vector` reads ours
//! and ours reads llama.cpp's cvector-generator output. `direction.N` is
//! added to layer N's output (`l_out-N`), the tensor it was measured on.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::Path;

/// The four quadrants, in the order of the steering coefficients.
pub const QUADRANTS: [&str; 4] = ["excited", "frustrated", "calm", "depleted"];

/// The contrastive pairs: for each quadrant, the same situation in the
/// quadrant's voice and in its opposite's.
const PAIRS: &str = include_str!("steering_pairs.txt");

/// `(quadrant index, quadrant's voice, opposite's voice)` for every pair.
pub fn pairs() -> Vec<(usize, &'static str, &'static str)> {
    let mut out = Vec::new();
    let mut current: Option<usize> = None;
    for line in PAIRS.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            current = QUADRANTS.iter().position(|q| *q == name);
            continue;
        }
        if let (Some(q), Some((pos, neg))) = (current, line.split_once(" | ")) {
            out.push((q, pos.trim(), neg.trim()));
        }
    }
    out
}

/// One quadrant's directions: `layers[l]` is added to layer `l`'s output
/// (empty for layers without one, always layer 0).
#[derive(Debug, Clone, PartialEq)]
pub struct DirectionSet {
    pub n_embd: usize,
    pub layers: Vec<Vec<f32>>,
    pub model_hint: String,
}

/// Reduce hidden-state differences to one calibrated direction per layer.
///
/// `diffs[p][l]` is pair p's (quadrant voice − opposite voice) output of
/// layer l at the last token. The direction is the mean difference (see
/// [`Reduction`] for why not the first principal component), and its length
/// the mean projection of the pair differences on it: "strength 1" is the
/// typical distance between the two voices at that layer, whatever the
/// layer's or model's hidden-state scale.
pub fn reduce(diffs: &[Vec<Vec<f32>>], n_layer: usize, n_embd: usize, model_hint: &str) -> (DirectionSet, Vec<Reduction>) {
    let mut layers = vec![Vec::new(); n_layer];
    let mut report = Vec::new();
    for l in 1..n_layer {
        let columns: Vec<&[f32]> = diffs.iter().filter_map(|d| d.get(l)).filter(|v| v.len() == n_embd).map(|v| v.as_slice()).collect();
        if columns.is_empty() {
            continue;
        }
        let mut mean = vec![0f64; n_embd];
        for c in &columns {
            for (m, x) in mean.iter_mut().zip(c.iter()) {
                *m += *x as f64 / columns.len() as f64;
            }
        }
        let unit = normalised(&mean);
        let projections: Vec<f64> = columns.iter().map(|c| dot(c, &unit)).collect();
        let scale = projections.iter().sum::<f64>() / projections.len() as f64;
        let pc = first_component(&columns, n_embd);
        report.push(Reduction {
            layer: l,
            mean_projection: scale,
            mean_diff_agreement: agreement(&columns, &unit),
            first_component_agreement: agreement(&columns, &pc),
        });
        layers[l] = unit.iter().map(|u| (u * scale) as f32).collect();
    }
    (DirectionSet { n_embd, layers, model_hint: model_hint.to_string() }, report)
}

/// How well one layer's direction fits its pairs: the share of pair
/// differences that point along it (positive projection), for the mean
/// difference and for the first principal component (sign chosen to agree
/// with the mean). The mean difference is used: on every test model it
/// agrees with at least as many pairs as the first component (which follows
/// the largest variance among the differences, often a topic or length
/// axis, not the mood), and it needs no sign choice.
#[derive(Debug, Clone, PartialEq)]
pub struct Reduction {
    pub layer: usize,
    pub mean_projection: f64,
    pub mean_diff_agreement: f64,
    pub first_component_agreement: f64,
}

fn dot(a: &[f32], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| *x as f64 * y).sum()
}

fn normalised(v: &[f64]) -> Vec<f64> {
    let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
    if norm == 0.0 {
        v.to_vec()
    } else {
        v.iter().map(|x| x / norm).collect()
    }
}

fn agreement(columns: &[&[f32]], direction: &[f64]) -> f64 {
    columns.iter().filter(|c| dot(c, direction) > 0.0).count() as f64 / columns.len() as f64
}

/// First principal component of the (uncentred, as llama.cpp's
/// cvector-generator does) differences, by power iteration; its sign is
/// chosen to agree with the mean difference.
fn first_component(columns: &[&[f32]], n_embd: usize) -> Vec<f64> {
    let mut v: Vec<f64> = vec![0.0; n_embd];
    for c in columns {
        for (a, x) in v.iter_mut().zip(c.iter()) {
            *a += *x as f64;
        }
    }
    v = normalised(&v);
    let mean = v.clone();
    for _ in 0..30 {
        let mut next = vec![0f64; n_embd];
        for c in columns {
            let p = dot(c, &v);
            for (n, x) in next.iter_mut().zip(c.iter()) {
                *n += p * *x as f64;
            }
        }
        v = normalised(&next);
    }
    if v.iter().zip(&mean).map(|(a, b)| a * b).sum::<f64>() < 0.0 {
        v.iter_mut().for_each(|x| *x = -*x);
    }
    v
}

/// The blend to set on the context: Σ coefficient × direction over the
/// quadrants, for layers `start..=end`, divided by the number of layers
/// (each layer's push adds up in the residual stream: spread this way,
/// strength 1 moves the last steered layer by about one typical contrast),
/// laid out as llama.cpp wants it: `n_embd` floats per layer from layer 1.
pub fn blend(sets: &[DirectionSet; 4], coefficients: [f32; 4], start: usize, end: usize, n_layer: usize) -> Vec<f32> {
    let n_embd = sets[0].n_embd;
    let span = (end + 1).saturating_sub(start).max(1) as f32;
    let mut data = vec![0f32; n_embd * n_layer.saturating_sub(1)];
    for l in start.max(1)..=end.min(n_layer - 1) {
        let out = &mut data[(l - 1) * n_embd..l * n_embd];
        for (set, &c) in sets.iter().zip(coefficients.iter()) {
            if let Some(d) = set.layers.get(l).filter(|d| d.len() == n_embd) {
                for (o, x) in out.iter_mut().zip(d) {
                    *o += c * x / span;
                }
            }
        }
    }
    data
}

// --- llama.cpp's control-vector GGUF -------------------------------------

const GGUF_MAGIC: &[u8; 4] = b"GGUF";
const GGUF_VERSION: u32 = 3;
const ALIGNMENT: u64 = 32;
const TYPE_U32: u32 = 4;
const TYPE_I32: u32 = 5;
const TYPE_STRING: u32 = 8;
const TYPE_ARRAY: u32 = 9;
const GGML_F32: u32 = 0;

/// Write `set` to `path` atomically: a temporary file in the same folder,
/// renamed over `path` once complete, so an interrupted write leaves no
/// partial file under the final name.
pub fn write_gguf(set: &DirectionSet, path: &Path) -> std::io::Result<()> {
    let tensors: Vec<(String, &Vec<f32>)> = set
        .layers
        .iter()
        .enumerate()
        .filter(|(l, d)| *l > 0 && d.len() == set.n_embd)
        .map(|(l, d)| (format!("direction.{l}"), d))
        .collect();
    let mut out = Vec::new();
    out.extend_from_slice(GGUF_MAGIC);
    out.extend_from_slice(&GGUF_VERSION.to_le_bytes());
    out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    out.extend_from_slice(&2u64.to_le_bytes());
    put_string(&mut out, "controlvector.model_hint");
    out.extend_from_slice(&TYPE_STRING.to_le_bytes());
    put_string(&mut out, &set.model_hint);
    put_string(&mut out, "controlvector.layer_count");
    out.extend_from_slice(&TYPE_I32.to_le_bytes());
    out.extend_from_slice(&(tensors.len() as i32).to_le_bytes());
    let mut offset = 0u64;
    for (name, data) in &tensors {
        put_string(&mut out, name);
        out.extend_from_slice(&1u32.to_le_bytes());
        out.extend_from_slice(&(data.len() as u64).to_le_bytes());
        out.extend_from_slice(&GGML_F32.to_le_bytes());
        out.extend_from_slice(&offset.to_le_bytes());
        offset += (data.len() as u64 * 4).next_multiple_of(ALIGNMENT);
    }
    pad(&mut out);
    for (_, data) in &tensors {
        for x in data.iter() {
            out.extend_from_slice(&x.to_le_bytes());
        }
        pad(&mut out);
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{}.{}.partial", path.file_name().and_then(|n| n.to_str()).unwrap_or("vectors"), std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&out)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn pad(out: &mut Vec<u8>) {
    while out.len() as u64 % ALIGNMENT != 0 {
        out.push(0);
    }
}

/// Read a control-vector file (ours or llama.cpp's cvector-generator's).
/// Only the `direction.N` f32 tensors and the model hint are used.
pub fn read_gguf(path: &Path) -> Result<DirectionSet, String> {
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    parse_gguf(&bytes).map_err(|e| format!("{} is not a control-vector GGUF: {e}", path.display()))
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len()).ok_or("truncated")?;
        let s = &self.bytes[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn string(&mut self) -> Result<String, String> {
        let n = self.u64()? as usize;
        Ok(String::from_utf8_lossy(self.take(n)?).into_owned())
    }
    /// Skip (or read, for strings) one value of GGUF type `t`.
    fn value(&mut self, t: u32) -> Result<Option<String>, String> {
        let size = match t {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4..=6 => 4,
            10..=12 => 8,
            TYPE_STRING => return self.string().map(Some),
            TYPE_ARRAY => {
                let inner = self.u32()?;
                let n = self.u64()?;
                for _ in 0..n {
                    self.value(inner)?;
                }
                return Ok(None);
            }
            other => return Err(format!("unknown metadata type {other}")),
        };
        self.take(size)?;
        Ok(None)
    }
}

fn parse_gguf(bytes: &[u8]) -> Result<DirectionSet, String> {
    let mut r = Reader { bytes, at: 0 };
    if r.take(4)? != GGUF_MAGIC {
        return Err("no GGUF magic".into());
    }
    let version = r.u32()?;
    if !(2..=3).contains(&version) {
        return Err(format!("GGUF version {version}"));
    }
    let n_tensors = r.u64()? as usize;
    let n_kv = r.u64()?;
    let mut meta: BTreeMap<String, String> = BTreeMap::new();
    let mut alignment = ALIGNMENT;
    for _ in 0..n_kv {
        let key = r.string()?;
        let t = r.u32()?;
        if key == "general.alignment" && t == TYPE_U32 {
            alignment = r.u32()? as u64;
            continue;
        }
        if let Some(s) = r.value(t)? {
            meta.insert(key, s);
        }
    }
    let mut infos = Vec::with_capacity(n_tensors.min(4096));
    for _ in 0..n_tensors {
        let name = r.string()?;
        let dims = r.u32()? as usize;
        let mut n = 1u64;
        for _ in 0..dims {
            n = n.saturating_mul(r.u64()?);
        }
        let ty = r.u32()?;
        let offset = r.u64()?;
        infos.push((name, n as usize, ty, offset));
    }
    let data_start = (r.at as u64).next_multiple_of(alignment.max(1)) as usize;
    let mut layers: Vec<Vec<f32>> = Vec::new();
    let mut n_embd = 0;
    for (name, n, ty, offset) in infos {
        let Some(layer) = name.strip_prefix("direction.").and_then(|l| l.parse::<usize>().ok()) else { continue };
        if ty != GGML_F32 {
            return Err(format!("{name} is not f32"));
        }
        if layer == 0 {
            return Err("direction.0: layer 0 cannot be steered".into());
        }
        if n_embd != 0 && n != n_embd {
            return Err(format!("{name} has {n} values, other directions {n_embd}"));
        }
        n_embd = n;
        let start = data_start + offset as usize;
        let raw = bytes.get(start..start + n * 4).ok_or_else(|| format!("{name}: data truncated"))?;
        if layers.len() <= layer {
            layers.resize(layer + 1, Vec::new());
        }
        layers[layer] = raw.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    }
    if n_embd == 0 {
        return Err("no direction.N tensors".into());
    }
    Ok(DirectionSet { n_embd, layers, model_hint: meta.get("controlvector.model_hint").cloned().unwrap_or_default() })
}

/// Check a set against the loaded model; the error names both shapes.
pub fn check_fits(set: &DirectionSet, n_embd: usize, n_layer: usize, what: &str) -> Result<(), String> {
    let highest = set.layers.iter().rposition(|d| !d.is_empty()).unwrap_or(0);
    if set.n_embd != n_embd || highest >= n_layer {
        return Err(format!(
            "{what} was made for another model: its directions have n_embd {} and reach layer {} (model hint {:?}), \
             but the loaded model has n_embd {n_embd} and {n_layer} layers",
            set.n_embd,
            highest,
            set.model_hint
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_least_forty_distinct_pairs_per_quadrant() {
        let pairs = pairs();
        for (q, name) in QUADRANTS.iter().enumerate() {
            let mine: Vec<_> = pairs.iter().filter(|p| p.0 == q).collect();
            assert!(mine.len() >= 40, "{name}: {} pairs", mine.len());
            let mut texts: Vec<&str> = mine.iter().flat_map(|p| [p.1, p.2]).collect();
            texts.sort();
            texts.dedup();
            assert_eq!(texts.len(), mine.len() * 2, "{name}: a text appears twice");
        }
    }

    #[test]
    fn gguf_round_trip_and_refusal() {
        let set = DirectionSet { n_embd: 3, layers: vec![vec![], vec![1.0, -2.0, 0.5], vec![], vec![3.0, 0.0, -1.0]], model_hint: "qwen2".into() };
        let dir = std::env::temp_dir().join(format!("elpis-cvec-{}", std::process::id()));
        let path = dir.join("excited.gguf");
        write_gguf(&set, &path).unwrap();
        let back = read_gguf(&path).unwrap();
        assert_eq!(back, set);
        assert!(std::fs::read_dir(&dir).unwrap().all(|e| !e.unwrap().file_name().to_string_lossy().contains("partial")));
        assert!(check_fits(&back, 3, 4, "x").is_ok());
        let e = check_fits(&back, 896, 24, "excited.gguf").unwrap_err();
        assert!(e.contains("n_embd 3") && e.contains("n_embd 896") && e.contains("24 layers"), "{e}");
        assert!(check_fits(&back, 3, 3, "x").unwrap_err().contains("reach layer 3"));
        std::fs::write(&path, b"GGUF\x03\0\0\0").unwrap();
        assert!(read_gguf(&path).unwrap_err().contains("truncated"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn reduction_finds_the_shared_direction_and_calibrates_it() {
        // Two layers; every pair differs by 2 along axis 0 plus noise on axis 1.
        let diffs: Vec<Vec<Vec<f32>>> = (0..8)
            .map(|i| vec![vec![], vec![2.0, if i % 2 == 0 { 1.0 } else { -1.0 }]])
            .collect();
        let (set, report) = reduce(&diffs, 2, 2, "test");
        assert!((set.layers[1][0] - 2.0).abs() < 1e-5 && set.layers[1][1].abs() < 1e-5, "{:?}", set.layers[1]);
        assert_eq!(report[0].mean_diff_agreement, 1.0);
        assert!((report[0].mean_projection - 2.0).abs() < 1e-9);
    }

    #[test]
    fn blend_weights_and_spreads() {
        let set = |x: f32| DirectionSet { n_embd: 2, layers: vec![vec![], vec![x, 0.0], vec![x, 0.0]], model_hint: String::new() };
        let sets = [set(1.0), set(2.0), set(3.0), set(4.0)];
        let data = blend(&sets, [1.0, 0.0, 0.0, 0.5], 1, 2, 3);
        assert_eq!(data.len(), 4);
        assert_eq!(data, vec![1.5, 0.0, 1.5, 0.0]);
        assert_eq!(blend(&sets, [1.0, 0.0, 0.0, 0.0], 2, 2, 3), vec![0.0, 0.0, 1.0, 0.0]);
    }
}
