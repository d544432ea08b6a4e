//! [`Probe`]: what the person's commands measure on a loaded engine that
//! is not serving (`vectors`, `steering-check`, `prompt`, the bench's
//! steering row): next-token logits, decode speed, the prompt a
//! conversation becomes, computing and setting the steering vectors. A
//! probe borrows the engine (see `Engine::probe`), so it runs on the
//! engine's thread and nothing else uses the context meanwhile.

use std::path::PathBuf;
use std::time::Instant;

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;

use crate::prompt::{segments, Message};

use super::admission::Admission;
use super::identity::Identity;
use super::model::token_text;
use super::request::EngineError;
use super::slots::SlotTable;
use super::steering::{Steering, SteeringReport, VectorJob};
use super::vectors::Reduction;

pub struct Probe<'a> {
    pub(super) model: &'static LlamaModel,
    pub(super) ctx: &'a mut LlamaContext<'static>,
    pub(super) slots: &'a mut SlotTable,
    pub(super) identity: &'a mut Identity,
    pub(super) steering: &'a mut Steering,
    pub(super) admission: &'a Admission,
}

impl Probe<'_> {
    /// `elpis-server vectors`: compute the four quadrant sets for the loaded
    /// model now, write them (each file atomically), and steer with them.
    /// `progress(done, all)` is called after every text.
    pub fn compute_vectors(
        &mut self,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<(PathBuf, Vec<(usize, Vec<Reduction>)>), String> {
        self.settle_steering();
        let unavailable = |s: &Steering| format!("steering is unavailable: {}", s.report().reason.unwrap_or_default());
        let dir = self.steering.folder().ok_or_else(|| unavailable(self.steering))?.to_path_buf();
        let (model_ptr, threads) = self.steering.job_parts().ok_or_else(|| unavailable(self.steering))?;
        let mut job = VectorJob::new(self.model, model_ptr, threads, dir.clone())?;
        while !job.slice(&mut || {})? {
            let (done, all) = job.progress();
            progress(done, all);
        }
        let (sets, reports) = job.finish()?;
        self.steering.install(sets, dir.clone());
        Ok((dir, reports))
    }

    /// Finish steering's setup now (identify the model, load its vectors).
    /// Computing missing vectors only happens when the settings ask for it.
    pub fn settle_steering(&mut self) {
        self.identity.settle();
        if let Some(sha256) = self.identity.sha256() {
            self.steering.identified(self.model, sha256);
        }
        while self.steering.busy() {
            self.steering.setup_slice(&mut || {});
        }
    }

    /// Steering now.
    pub fn steering_report(&self) -> SteeringReport {
        self.steering.report()
    }

    /// Set the blend of `coefficients` on the context now (None: no control
    /// vector at all).
    pub fn set_steering(&mut self, coefficients: Option<[f32; 4]>) -> Result<(), String> {
        match coefficients {
            Some(c) if self.steering.is_on() => {
                self.steering.apply(c);
                self.steering.is_on().then_some(()).ok_or_else(|| "steering turned off".to_string())
            }
            Some(_) => Err(format!("steering is off: {}", self.steering.report().reason.unwrap_or_default())),
            None => self.steering.clear(),
        }
    }

    /// The next-token logits after `text` (plain text, BOS first), decoded
    /// on slot 0's sequence, which is emptied after.
    pub fn next_token_logits(&mut self, text: &str) -> Result<Vec<f32>, String> {
        let tokens = self.model.vocab().tokenize(text.as_bytes(), true, false);
        Ok(self.decode_alone(&tokens, 0)?.0)
    }

    /// The first token of `text` as plain text (no BOS).
    pub fn first_token(&self, text: &str) -> Option<i32> {
        self.model.vocab().tokenize(text.as_bytes(), false, false).first().map(|t| t.0)
    }

    /// Greedy decode speed (tokens per second over `n` tokens after `text`)
    /// on slot 0's sequence, emptied after.
    pub fn decode_speed(&mut self, text: &str, n: usize) -> Result<f64, String> {
        let tokens = self.model.vocab().tokenize(text.as_bytes(), true, false);
        Ok(self.decode_alone(&tokens, n)?.1)
    }

    /// Decode `prompt` on sequence 0, then `extra` greedy tokens one at a
    /// time; returns the prompt's last logits and the decode speed.
    fn decode_alone(&mut self, prompt: &[LlamaToken], extra: usize) -> Result<(Vec<f32>, f64), String> {
        self.slots.trim(0, 0, self.ctx);
        let seq = self.slots.slots[0].seq;
        let mut batch = LlamaBatch::new(prompt.len().max(1), 1);
        for (i, t) in prompt.iter().enumerate() {
            batch.add(*t, i as i32, &[seq], i + 1 == prompt.len()).map_err(|e| e.to_string())?;
        }
        self.ctx.decode(&mut batch).map_err(|e| e.to_string())?;
        let logits = self.ctx.get_logits_ith(batch.n_tokens() - 1).to_vec();
        let mut last = argmax(&logits);
        let started = Instant::now();
        for i in 0..extra {
            batch.clear();
            batch.add(last, (prompt.len() + i) as i32, &[seq], true).map_err(|e| e.to_string())?;
            self.ctx.decode(&mut batch).map_err(|e| e.to_string())?;
            last = argmax(self.ctx.get_logits_ith(0));
        }
        let speed = extra as f64 / started.elapsed().as_secs_f64().max(1e-9);
        let _ = self.ctx.clear_kv_cache_seq(Some(seq as u32), None, None);
        Ok((logits, speed))
    }

    /// What the model is fed for a conversation, for `elpis-server prompt`:
    /// the text, its segments, the tokens, and the vocabulary's control
    /// tokens (their text) to test injection with.
    pub fn inspect_prompt(
        &self,
        messages: &[Message],
        tools: Option<&[serde_json::Value]>,
        plain: &[String],
    ) -> Result<serde_json::Value, EngineError> {
        let segments = self.admission.render(messages, tools)?;
        let tokens = self.admission.tokenize(&segments);
        let vocab = self.model.vocab();
        let control: Vec<LlamaToken> = vocab.tokens().filter(|&t| vocab.is_control(t)).collect();
        Ok(serde_json::json!({
            "template": self.admission.renderer.template_source(tools.is_some()),
            "bos_token": token_text(self.model, vocab.bos()),
            "eos_token": token_text(self.model, vocab.eos()),
            "text": segments::joined(&segments),
            "segments": segments.iter().map(|s| serde_json::json!({"text": s.text, "special": s.special})).collect::<Vec<_>>(),
            "tokens": tokens.iter().map(|t| t.0).collect::<Vec<_>>(),
            "control_tokens": control.iter().map(|&t| token_text(self.model, t)).filter(|t| !t.is_empty()).collect::<Vec<_>>(),
            "control_token_ids": control.iter().map(|t| t.0).collect::<Vec<_>>(),
            "plain_tokens": plain.iter().map(|p| vocab.tokenize(p.as_bytes(), false, false).iter().map(|t| t.0).collect::<Vec<_>>()).collect::<Vec<_>>(),
        }))
    }
}

fn argmax(logits: &[f32]) -> LlamaToken {
    LlamaToken(logits.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i as i32).unwrap_or(0))
}
