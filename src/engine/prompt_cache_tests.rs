//! The prompt-cache file loader under damage (see `prompt_cache.rs`).

use super::*;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};

fn fingerprint(build: &str) -> Fingerprint {
    Fingerprint { model_sha256: "ab".repeat(32), n_ctx: 4096, n_seq: 2, kv_type: "f16".into(), swa_full: true, build: build.into() }
}

/// An entry as `begin` and the slices write it.
fn entry(fingerprint: &Fingerprint, tokens: &[i32], payload: &[u8]) -> Vec<u8> {
    let header = serde_json::to_vec(&Header { fingerprint: fingerprint.clone(), tokens: tokens.len(), payload: payload.len() }).unwrap();
    let mut bytes = MAGIC.to_vec();
    bytes.extend_from_slice(&(header.len() as u32).to_le_bytes());
    bytes.extend_from_slice(&header);
    tokens.iter().for_each(|t| bytes.extend_from_slice(&t.to_le_bytes()));
    bytes.extend_from_slice(payload);
    let sum = Sha256::digest(&bytes);
    bytes.extend_from_slice(&sum);
    bytes
}

/// What the cache would load from `bytes`: the tokens and the state,
/// only when the header, the fingerprint and the checksum all hold.
fn load(path: &Path, bytes: &[u8], want: &Fingerprint) -> Option<(Vec<LlamaToken>, Vec<u8>)> {
    std::fs::write(path, bytes).unwrap();
    let (header, tokens, _) = read_header(path).ok()?;
    if header.fingerprint != *want {
        return None;
    }
    let state = read_payload(path, tokens.len(), &mut || {}).ok()?;
    Some((tokens, state))
}

/// Truncated, bit-flipped, lengthened, foreign-model and wrong-build
/// entries are never loaded, and the exact one always is. Fixed cases;
/// ELPIS_PROPTEST_CASES runs more.
#[test]
fn an_entry_not_exactly_right_is_never_loaded() {
    let cases = std::env::var("ELPIS_PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(2000);
    let mut runner = TestRunner::new_with_rng(Config { cases, failure_persistence: None, ..Config::default() }, TestRng::from_seed(RngAlgorithm::ChaCha, &[3; 32]));
    let dir = std::env::temp_dir().join(format!("elpis-cache-props-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("entry.kv");
    let want = fingerprint(LLAMA_BUILD);
    #[derive(Debug, Clone)]
    enum Damage {
        Cut(usize),
        Flip(usize, u8),
        Append(Vec<u8>),
        Foreign,
        OtherBuild,
    }
    let damage = prop_oneof![
        any::<usize>().prop_map(Damage::Cut),
        (any::<usize>(), 0u8..8).prop_map(|(at, bit)| Damage::Flip(at, bit)),
        proptest::collection::vec(any::<u8>(), 1..16).prop_map(Damage::Append),
        Just(Damage::Foreign),
        Just(Damage::OtherBuild),
    ];
    let case = (proptest::collection::vec(any::<i32>(), 0..40), proptest::collection::vec(any::<u8>(), 0..300), damage);
    let outcome = runner.run(&case, |(tokens, payload, damage)| {
        let exact = entry(&want, &tokens, &payload);
        let loaded = load(&path, &exact, &want);
        prop_assert_eq!(loaded, Some((tokens.iter().map(|t| LlamaToken(*t)).collect(), payload.clone())));
        let damaged = match damage {
            Damage::Cut(at) => exact[..at % exact.len()].to_vec(),
            Damage::Flip(at, bit) => {
                let mut b = exact.clone();
                b[at % exact.len()] ^= 1 << bit;
                b
            }
            Damage::Append(more) => [exact.clone(), more].concat(),
            Damage::Foreign => entry(&Fingerprint { model_sha256: "cd".repeat(32), ..want.clone() }, &tokens, &payload),
            Damage::OtherBuild => entry(&fingerprint("llama-cpp-sys-2 0.0.1"), &tokens, &payload),
        };
        prop_assert_eq!(load(&path, &damaged, &want), None);
        Ok(())
    });
    let _ = std::fs::remove_dir_all(&dir);
    if let Err(e) = outcome {
        panic!("{e}");
    }
}
