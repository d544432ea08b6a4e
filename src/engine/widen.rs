//! Q5_0 weights held as Q8_0, without changing a value: a GGUF copy where
//! every Q5_0 matrix is rewritten block by block (the same scale, each
//! 5-bit integer as an 8-bit one), loaded instead of the original.
//!
//! Why: models whose rows are not a multiple of 256 (Qwen2.5-0.5B's 896,
//! the default model) cannot use k-quants, so a "Q4_K_M" file is mostly
//! Q5_0, whose CPU kernels unpack five-bit values for every row of every
//! step. ggml's Q8_0 kernels read plain bytes (llama-bench on this
//! project's 2-core AVX2 machine, Qwen2.5-0.5B, 2 threads, alternating:
//! prompt 166-179 tok/s against 125-139, decode 41-43 against 37.5). The
//! price is memory: 34 bytes per 32 weights instead of 22 (for the default
//! model 90 MiB more in RAM, and the copy on disk). The arithmetic sees the
//! same numbers: a Q5_0 block holds `d` and integers in -16..=15, a Q8_0
//! block `d` and integers in -128..=127, and a weight is `d * q` in both.
//!
//! Only matrices the CPU multiplies are widened: the token embeddings are
//! looked up row by row, so they stay as they are. The copy is made once
//! per model file (keyed by its path, size and modification time) in the
//! cache folder and reused; a file with no Q5_0 matrix is loaded as it is.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// ggml's type ids (ggml.h) of the two formats.
const GGML_TYPE_Q5_0: u32 = 6;
const GGML_TYPE_Q8_0: u32 = 8;
/// Weights per block, and bytes per block, of each.
const BLOCK: u64 = 32;
const Q5_0_BYTES: usize = 22;
const Q8_0_BYTES: usize = 34;
/// GGUF's magic, and its alignment where the file names none.
const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;

/// One tensor's entry in the GGUF header.
#[derive(Debug, Clone)]
struct TensorInfo {
    name: Vec<u8>,
    dims: Vec<u64>,
    ggml_type: u32,
    offset: u64,
}

impl TensorInfo {
    fn elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// Rewritten here: a Q5_0 matrix other than the token embeddings.
    fn widened(&self) -> bool {
        self.ggml_type == GGML_TYPE_Q5_0 && self.dims.len() >= 2 && !self.name.starts_with(b"token_embd.")
    }
}

/// What a GGUF header says, and where its parts are.
struct Header {
    version: u32,
    /// The metadata section, as it is in the file.
    metadata: Vec<u8>,
    n_kv: u64,
    tensors: Vec<TensorInfo>,
    alignment: u64,
    /// Where the tensor data starts in the file.
    data_start: u64,
}

fn bad(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

fn u32_of(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

fn u64_of(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

fn string_of(r: &mut impl Read) -> io::Result<Vec<u8>> {
    let n = u64_of(r)?;
    if n > 1 << 20 {
        return Err(bad(format!("a GGUF string of {n} bytes")));
    }
    let mut s = vec![0; n as usize];
    r.read_exact(&mut s)?;
    Ok(s)
}

/// Reads one metadata value of type `ty`, appending its bytes to `out`;
/// the value itself when it is an unsigned integer (the alignment is one).
fn value(r: &mut impl Read, ty: u32, out: &mut Vec<u8>) -> io::Result<Option<u64>> {
    let fixed = match ty {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        10..=12 => 8,
        8 => {
            let s = string_of(r)?;
            out.extend_from_slice(&(s.len() as u64).to_le_bytes());
            out.extend_from_slice(&s);
            return Ok(None);
        }
        9 => {
            let item = u32_of(r)?;
            let n = u64_of(r)?;
            out.extend_from_slice(&item.to_le_bytes());
            out.extend_from_slice(&n.to_le_bytes());
            for _ in 0..n {
                value(r, item, out)?;
            }
            return Ok(None);
        }
        _ => return Err(bad(format!("a GGUF value of unknown type {ty}"))),
    };
    let mut b = [0u8; 8];
    r.read_exact(&mut b[..fixed])?;
    out.extend_from_slice(&b[..fixed]);
    Ok(match ty {
        4 | 10 => Some(u64::from_le_bytes(b)),
        _ => None,
    })
}

fn read_header(r: &mut (impl Read + Seek)) -> io::Result<Header> {
    let mut magic = [0; 4];
    r.read_exact(&mut magic)?;
    if &magic != MAGIC {
        return Err(bad("not a GGUF file"));
    }
    let version = u32_of(r)?;
    if !(2..=3).contains(&version) {
        return Err(bad(format!("GGUF version {version}")));
    }
    let n_tensors = u64_of(r)?;
    let n_kv = u64_of(r)?;
    let mut metadata = Vec::new();
    let mut alignment = DEFAULT_ALIGNMENT;
    for _ in 0..n_kv {
        let key = string_of(r)?;
        let ty = u32_of(r)?;
        metadata.extend_from_slice(&(key.len() as u64).to_le_bytes());
        metadata.extend_from_slice(&key);
        metadata.extend_from_slice(&ty.to_le_bytes());
        let v = value(r, ty, &mut metadata)?;
        if key == b"general.alignment" {
            alignment = v.filter(|a| *a > 0 && a.is_power_of_two()).ok_or_else(|| bad("a bad general.alignment"))?;
        }
    }
    let mut tensors = Vec::new();
    for _ in 0..n_tensors {
        let name = string_of(r)?;
        let n_dims = u32_of(r)?;
        if n_dims > 4 {
            return Err(bad(format!("a tensor of {n_dims} dimensions")));
        }
        let dims = (0..n_dims).map(|_| u64_of(r)).collect::<io::Result<Vec<_>>>()?;
        let ggml_type = u32_of(r)?;
        let offset = u64_of(r)?;
        tensors.push(TensorInfo { name, dims, ggml_type, offset });
    }
    let data_start = r.stream_position()?.next_multiple_of(alignment);
    Ok(Header { version, metadata, n_kv, tensors, alignment, data_start })
}

/// One Q5_0 block as the Q8_0 block of the same weights.
fn widen_block(q5: &[u8], q8: &mut [u8]) {
    q8[..2].copy_from_slice(&q5[..2]);
    let high = u32::from_le_bytes([q5[2], q5[3], q5[4], q5[5]]);
    let low = &q5[6..22];
    for j in 0..16 {
        let first = (low[j] & 0x0F) | ((((high >> j) & 1) as u8) << 4);
        let second = (low[j] >> 4) | ((((high >> (j + 16)) & 1) as u8) << 4);
        q8[2 + j] = (first as i8 - 16) as u8;
        q8[2 + 16 + j] = (second as i8 - 16) as u8;
    }
}

/// Bytes of a tensor's data in the file (Q5_0 and Q8_0 only; others are
/// measured by where the next tensor starts).
fn size_of(t: &TensorInfo, ggml_type: u32) -> Option<u64> {
    let blocks = t.elements() / BLOCK;
    match ggml_type {
        GGML_TYPE_Q5_0 => Some(blocks * Q5_0_BYTES as u64),
        GGML_TYPE_Q8_0 => Some(blocks * Q8_0_BYTES as u64),
        _ => None,
    }
}

/// Write `model` with its Q5_0 matrices as Q8_0 to `out` (through a
/// temporary file renamed at the end, so a copy is whole or absent; a
/// failed one is removed).
/// `between` runs after each tensor (the server answers requests meanwhile).
pub(super) fn widen(model: &Path, out: &Path, between: &mut dyn FnMut()) -> io::Result<()> {
    // Each process its own partial file (two servers may start at once).
    let partial = out.with_extension(format!("{}.partial", std::process::id()));
    let written = write_widened(model, &partial, between).and_then(|()| std::fs::rename(&partial, out));
    if written.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    written
}

fn write_widened(model: &Path, partial: &Path, between: &mut dyn FnMut()) -> io::Result<()> {
    let file_len = std::fs::metadata(model)?.len();
    let mut r = BufReader::with_capacity(1 << 20, File::open(model)?);
    let h = read_header(&mut r)?;
    // Sizes of the originals: Q5_0 by its blocks, the rest up to the next
    // tensor's start (or the end of the file).
    let mut by_offset: Vec<usize> = (0..h.tensors.len()).collect();
    by_offset.sort_by_key(|&i| h.tensors[i].offset);
    let mut old_size = vec![0u64; h.tensors.len()];
    for (k, &i) in by_offset.iter().enumerate() {
        let end = by_offset.get(k + 1).map_or(file_len - h.data_start, |&n| h.tensors[n].offset);
        let t = &h.tensors[i];
        old_size[i] = match size_of(t, t.ggml_type) {
            Some(exact) if t.offset + exact <= end => exact,
            Some(_) => return Err(bad("a Q5_0 tensor overruns the next one")),
            None => end.checked_sub(t.offset).ok_or_else(|| bad("overlapping tensors"))?,
        };
        if t.widened() && t.elements() % BLOCK != 0 {
            return Err(bad("a Q5_0 tensor that is not whole blocks"));
        }
    }
    // The new layout: same order, each tensor aligned.
    let mut new_offset = vec![0u64; h.tensors.len()];
    let mut at = 0u64;
    for &i in &by_offset {
        let t = &h.tensors[i];
        new_offset[i] = at;
        let size = if t.widened() { size_of(t, GGML_TYPE_Q8_0).unwrap_or(0) } else { old_size[i] };
        at = (at + size).next_multiple_of(h.alignment);
    }
    let mut w = BufWriter::with_capacity(1 << 20, File::create(partial)?);
    w.write_all(MAGIC)?;
    w.write_all(&h.version.to_le_bytes())?;
    w.write_all(&(h.tensors.len() as u64).to_le_bytes())?;
    w.write_all(&h.n_kv.to_le_bytes())?;
    w.write_all(&h.metadata)?;
    for (i, t) in h.tensors.iter().enumerate() {
        w.write_all(&(t.name.len() as u64).to_le_bytes())?;
        w.write_all(&t.name)?;
        w.write_all(&(t.dims.len() as u32).to_le_bytes())?;
        for d in &t.dims {
            w.write_all(&d.to_le_bytes())?;
        }
        let ty = if t.widened() { GGML_TYPE_Q8_0 } else { t.ggml_type };
        w.write_all(&ty.to_le_bytes())?;
        w.write_all(&new_offset[i].to_le_bytes())?;
    }
    let mut written = w.stream_position()?;
    let aligned = written.next_multiple_of(h.alignment);
    pad(&mut w, &mut written, aligned)?;
    let data_start = written;
    let mut block = [0u8; Q5_0_BYTES];
    let mut wide = [0u8; Q8_0_BYTES];
    for &i in &by_offset {
        let t = &h.tensors[i];
        pad(&mut w, &mut written, data_start + new_offset[i])?;
        r.seek(SeekFrom::Start(h.data_start + t.offset))?;
        if t.widened() {
            for _ in 0..t.elements() / BLOCK {
                r.read_exact(&mut block)?;
                widen_block(&block, &mut wide);
                w.write_all(&wide)?;
            }
            written += size_of(t, GGML_TYPE_Q8_0).unwrap_or(0);
        } else {
            let copied = io::copy(&mut (&mut r).take(old_size[i]), &mut w)?;
            if copied != old_size[i] {
                return Err(bad("the model file ended early"));
            }
            written += copied;
        }
        between();
    }
    let aligned = written.next_multiple_of(h.alignment);
    pad(&mut w, &mut written, aligned)?;
    w.into_inner().map_err(|e| e.into_error())?.sync_all()
}

/// Zeros from `written` up to `to`.
fn pad(w: &mut impl Write, written: &mut u64, to: u64) -> io::Result<()> {
    w.write_all(&vec![0u8; (to - *written) as usize])?;
    *written = to;
    Ok(())
}

/// The model file to load: `model`, or its widened copy in `cache_dir`
/// (made now if missing, when it fits on the disk and in memory), and how
/// many matrices the copy widens (0: the original is loaded). `between`
/// runs while the copy is written.
pub(super) fn prepare(model: &Path, cache_dir: &Path, between: &mut dyn FnMut()) -> (PathBuf, usize) {
    match copy_for(model, cache_dir, between) {
        Ok(Some((copy, matrices))) => (copy, matrices),
        Ok(None) => (model.to_path_buf(), 0),
        Err(e) => {
            tracing::warn!("wide weights: {e}; the model is loaded as it is");
            (model.to_path_buf(), 0)
        }
    }
}

fn copy_for(model: &Path, cache_dir: &Path, between: &mut dyn FnMut()) -> io::Result<Option<(PathBuf, usize)>> {
    let header = read_header(&mut BufReader::new(File::open(model)?))?;
    let widened: Vec<&TensorInfo> = header.tensors.iter().filter(|t| t.widened()).collect();
    if widened.is_empty() {
        return Ok(None);
    }
    let folder = cache_dir.join("wide");
    let name = copy_name(model)?;
    let copy = folder.join(format!("{name}.gguf"));
    if copy.is_file() {
        return Ok(Some((copy, widened.len())));
    }
    let extra: u64 = widened.iter().map(|t| t.elements() / BLOCK * (Q8_0_BYTES - Q5_0_BYTES) as u64).sum();
    let size = std::fs::metadata(model)?.len() + extra;
    std::fs::create_dir_all(&folder)?;
    // Room: the copy and 1 GiB besides on the disk; the extra weights
    // within a quarter of the memory available now.
    let free = rustix::fs::statvfs(&folder).map(|s| s.f_bavail.saturating_mul(s.f_frsize)).map_err(io::Error::from)?;
    if free < size + (1 << 30) {
        tracing::info!(free_mib = free >> 20, copy_mib = size >> 20, "wide weights: not enough disk for the copy; the model is loaded as it is");
        return Ok(None);
    }
    if let Some(available) = super::meminfo::available() {
        if extra > available / 4 {
            tracing::info!(available_mib = available >> 20, extra_mib = extra >> 20, "wide weights: not enough memory; the model is loaded as it is");
            return Ok(None);
        }
    }
    // Copies of this path made from an earlier version of the file go, as
    // do partial ones a process left (not those another is writing now).
    let prefix = format!("{}-", name.split('-').next().unwrap_or_default());
    for entry in std::fs::read_dir(&folder)?.flatten() {
        let file = entry.file_name().to_string_lossy().into_owned();
        let age = entry.metadata().and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok());
        let left = file.ends_with(".partial") && age.is_some_and(|a| a.as_secs() > 600);
        if file.starts_with(&prefix) && (file.ends_with(".gguf") || left) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    let started = std::time::Instant::now();
    widen(model, &copy, between)?;
    tracing::info!(matrices = widened.len(), extra_mib = extra >> 20, ms = started.elapsed().as_millis() as u64, copy = %copy.display(), "wide weights: Q5_0 matrices written as Q8_0");
    Ok(Some((copy, widened.len())))
}

/// The copy's name in the cache folder's `wide/`: a hash of the model's
/// path, then one of its size and modification time (a changed file gets a
/// new copy, and the old one is removed).
fn copy_name(model: &Path) -> io::Result<String> {
    use sha2::{Digest, Sha256};
    let meta = std::fs::metadata(model)?;
    let modified = meta.modified()?.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let path = std::fs::canonicalize(model)?;
    let hex = |text: String| Sha256::digest(text.as_bytes())[..8].iter().map(|b| format!("{b:02x}")).collect::<String>();
    Ok(format!("{}-{}", hex(path.display().to_string()), hex(format!("{}:{modified}", meta.len()))))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ggml's own Q5_0 decoding (dequantize_row_q5_0), for one block.
    fn q5_values(q5: &[u8]) -> Vec<i32> {
        let high = u32::from_le_bytes([q5[2], q5[3], q5[4], q5[5]]);
        let mut v = vec![0; 32];
        for j in 0..16 {
            let h0 = (((high >> j) << 4) & 0x10) as i32;
            let h1 = ((high >> (j + 12)) & 0x10) as i32;
            v[j] = ((q5[6 + j] & 0x0F) as i32 | h0) - 16;
            v[j + 16] = ((q5[6 + j] >> 4) as i32 | h1) - 16;
        }
        v
    }

    #[test]
    fn a_widened_block_holds_the_same_weights() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..1000 {
            let mut q5 = [0u8; Q5_0_BYTES];
            for b in q5.iter_mut() {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                *b = seed as u8;
            }
            let mut q8 = [0u8; Q8_0_BYTES];
            widen_block(&q5, &mut q8);
            assert_eq!(q8[..2], q5[..2], "the scale is kept");
            let q8_values: Vec<i32> = q8[2..].iter().map(|&b| b as i8 as i32).collect();
            assert_eq!(q8_values, q5_values(&q5));
        }
    }

    /// A GGUF header and data, written by hand: every value type the
    /// rewrite must step over, and three tensors.
    fn sample_gguf(tensors: &[(&str, Vec<u64>, u32, Vec<u8>)]) -> Vec<u8> {
        let text = |out: &mut Vec<u8>, s: &str| {
            out.extend_from_slice(&(s.len() as u64).to_le_bytes());
            out.extend_from_slice(s.as_bytes());
        };
        let mut f = MAGIC.to_vec();
        f.extend_from_slice(&3u32.to_le_bytes());
        f.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
        f.extend_from_slice(&3u64.to_le_bytes());
        text(&mut f, "general.alignment");
        f.extend_from_slice(&4u32.to_le_bytes());
        f.extend_from_slice(&64u32.to_le_bytes());
        text(&mut f, "general.name");
        f.extend_from_slice(&8u32.to_le_bytes());
        text(&mut f, "tiny");
        text(&mut f, "tokenizer.ggml.tokens");
        f.extend_from_slice(&9u32.to_le_bytes());
        f.extend_from_slice(&8u32.to_le_bytes());
        f.extend_from_slice(&2u64.to_le_bytes());
        text(&mut f, "a");
        text(&mut f, "bc");
        let mut offset = 0u64;
        for (name, dims, ty, data) in tensors {
            text(&mut f, name);
            f.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in dims {
                f.extend_from_slice(&d.to_le_bytes());
            }
            f.extend_from_slice(&ty.to_le_bytes());
            f.extend_from_slice(&offset.to_le_bytes());
            offset = (offset + data.len() as u64).next_multiple_of(64);
        }
        f.resize(f.len().next_multiple_of(64), 0);
        for (_, _, _, data) in tensors {
            f.extend_from_slice(data);
            f.resize(f.len().next_multiple_of(64), 0);
        }
        f
    }

    #[test]
    fn a_model_file_is_rewritten_with_its_q5_0_matrices_as_q8_0() {
        let blocks = |n: usize, seed: u8| (0..n * Q5_0_BYTES).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect::<Vec<u8>>();
        let matrix = blocks(4, 7);
        let embeddings = blocks(2, 9);
        let norm: Vec<u8> = (0..12).collect();
        let tensors = [
            ("token_embd.weight", vec![32, 2], GGML_TYPE_Q5_0, embeddings.clone()),
            ("blk.0.ffn_up.weight", vec![64, 2], GGML_TYPE_Q5_0, matrix.clone()),
            ("blk.0.attn_norm.weight", vec![3], 0, norm.clone()),
        ];
        let dir = std::env::temp_dir().join(format!("elpis-widen-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (model, out) = (dir.join("tiny.gguf"), dir.join("wide.gguf"));
        std::fs::write(&model, sample_gguf(&tensors)).unwrap();
        let mut calls = 0;
        widen(&model, &out, &mut || calls += 1).unwrap();
        assert_eq!(calls, 3, "between runs after each tensor");
        let bytes = std::fs::read(&out).unwrap();
        let h = read_header(&mut io::Cursor::new(&bytes)).unwrap();
        let original = read_header(&mut io::Cursor::new(std::fs::read(&model).unwrap())).unwrap();
        assert_eq!((h.metadata, h.n_kv, h.alignment), (original.metadata, 3, 64), "the metadata is copied as it was");
        let types: Vec<u32> = h.tensors.iter().map(|t| t.ggml_type).collect();
        assert_eq!(types, [GGML_TYPE_Q5_0, GGML_TYPE_Q8_0, 0], "only the matrix the CPU multiplies is widened");
        let data = |i: usize, len: usize| {
            let at = (h.data_start + h.tensors[i].offset) as usize;
            assert_eq!(at % 64, 0, "tensor {i} is aligned");
            &bytes[at..at + len]
        };
        assert_eq!(data(0, embeddings.len()), &embeddings[..]);
        assert_eq!(data(2, norm.len()), &norm[..]);
        let mut wide = [0u8; Q8_0_BYTES];
        for (k, block) in matrix.chunks(Q5_0_BYTES).enumerate() {
            widen_block(block, &mut wide);
            assert_eq!(&data(1, 4 * Q8_0_BYTES)[k * Q8_0_BYTES..(k + 1) * Q8_0_BYTES], &wide[..]);
        }
        assert_eq!(bytes.len() % 64, 0);
        // A file that is not a GGUF is refused, and leaves nothing behind.
        std::fs::write(&model, b"not a model").unwrap();
        assert!(widen(&model, &dir.join("bad.gguf"), &mut || {}).is_err());
        let left: Vec<_> = std::fs::read_dir(&dir).unwrap().flatten().map(|e| e.file_name()).collect();
        assert_eq!(left.len(), 2, "{left:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
