//! `elpis-server vectors` (compute the loaded model's emotion vectors, with
//! a progress bar on stderr) and `elpis-server steering-check` (measure
//! what steering does: word-probability margins under two moods, strength 0
//! against no steering, and decode speed). They print reports to stdout: a
//! person's commands, not the server.

use crate::config::Config;
use crate::emotion::SteeringCoefficients;
use crate::engine::{Engine, Probe, QUADRANTS};

/// The measurement's neutral prompts: nothing in them leans to a mood.
pub const NEUTRAL_PROMPTS: [&str; 24] = [
    "Today I feel",
    "Right now my mood is",
    "When I think about tomorrow, I feel",
    "The meeting this afternoon was",
    "Honestly, the whole week has been",
    "Looking at my inbox, I feel",
    "After lunch I was feeling",
    "My first thought this morning was that everything is",
    "Walking home, I felt",
    "The news today made me feel",
    "When the phone rang, I felt",
    "Thinking about the project, I am",
    "Overall, I would describe my day as",
    "Sitting at my desk, I feel",
    "When I opened the door, I felt",
    "This evening I am feeling",
    "The weekend ahead looks",
    "Reading the message, I felt",
    "On the train this morning I felt",
    "Right before the call, I was",
    "Looking back on the day, it was",
    "As the sun set, I felt",
    "After the conversation, I felt",
    "When I saw the results, I was",
];

/// Words of a good mood and of a bad one (each scored by its first token,
/// with a leading space, as it would follow the prompts).
pub const POSITIVE_WORDS: [&str; 24] = [
    "happy", "great", "wonderful", "excited", "joyful", "calm", "peaceful", "grateful", "cheerful", "delighted",
    "fantastic", "good", "optimistic", "relaxed", "amazing", "thrilled", "content", "hopeful", "proud", "glad",
    "energized", "lovely", "bright", "confident",
];
pub const NEGATIVE_WORDS: [&str; 24] = [
    "sad", "terrible", "awful", "angry", "tired", "exhausted", "miserable", "frustrated", "anxious", "upset",
    "depressed", "bad", "hopeless", "annoyed", "stressed", "lonely", "bored", "drained", "worried", "furious",
    "gloomy", "irritated", "empty", "down",
];

fn load(config: &Config) -> anyhow::Result<Engine> {
    let (mut engine, _handle) = Engine::load(&config.measurement_settings(), None)?;
    engine.probe().settle_steering();
    Ok(engine)
}

/// `elpis-server vectors`.
pub fn vectors(config: &Config) -> anyhow::Result<()> {
    let mut engine = load(config)?;
    let mut engine = engine.probe();
    let bar = indicatif::ProgressBar::new(1).with_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} texts, {elapsed} (eta {eta})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
    bar.set_message("reading the contrastive pairs");
    let started = std::time::Instant::now();
    let (dir, reports) = engine
        .compute_vectors(|done, all| {
            bar.set_length(all as u64);
            bar.set_position(done as u64);
            // Without a terminal the bar draws nothing: log every tenth instead.
            if bar.is_hidden() && (done == 1 || done * 10 / all.max(1) != (done - 1) * 10 / all.max(1)) {
                tracing::info!("vectors: {done} of {all} texts read");
            }
        })
        .map_err(anyhow::Error::msg)?;
    bar.finish_and_clear();
    println!("vectors for {} written to {} in {:.1} s", config.model_path().display(), dir.display(), started.elapsed().as_secs_f64());
    println!("per quadrant, over the steered layers: mean projection of the pair differences on the direction");
    println!("(the calibration: strength 1 = that distance), and the share of pairs whose difference points along");
    println!("the mean difference (used) and along the first principal component:");
    let steered = engine.steering_report().layers.unwrap_or([1, usize::MAX]);
    for (q, report) in reports {
        let rows: Vec<_> = report.iter().filter(|r| r.layer >= steered[0] && r.layer <= steered[1]).collect();
        let n = rows.len().max(1) as f64;
        let projection = rows.iter().map(|r| r.mean_projection).sum::<f64>() / n;
        let mean_diff = rows.iter().map(|r| r.mean_diff_agreement).sum::<f64>() / n;
        let pca = rows.iter().map(|r| r.first_component_agreement).sum::<f64>() / n;
        println!(
            "  {:<10} layers {}-{}: mean projection {:>8.3}  agreement: mean difference {:>5.1} %, first component {:>5.1} %",
            QUADRANTS[q],
            steered[0],
            steered[1],
            projection,
            100.0 * mean_diff,
            100.0 * pca
        );
    }
    Ok(())
}

fn log_softmax_at(logits: &[f32], ids: &[i32]) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let log_z = max + logits.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln();
    let picked: Vec<f64> = ids.iter().map(|&i| logits[i as usize] as f64 - log_z).collect();
    let m = picked.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    m + picked.iter().map(|x| (x - m).exp()).sum::<f64>().ln()
}

/// `elpis-server steering-check`.
pub fn check(config: &Config) -> anyhow::Result<()> {
    let model_path = config.model_path();
    let mut loaded = load(config)?;
    let mut engine = loaded.probe();
    let report = engine.steering_report();
    if !report.enabled {
        // Vectors are missing: compute them first.
        eprintln!("steering-check: no vectors yet ({}); computing them", report.reason.unwrap_or_default());
        engine.compute_vectors(|_, _| {}).map_err(anyhow::Error::msg)?;
    }
    let word_ids = |words: &[&str]| -> Vec<i32> {
        let mut ids: Vec<i32> = words.iter().filter_map(|w| engine.first_token(&format!(" {w}"))).collect();
        ids.sort();
        ids.dedup();
        ids
    };
    let (pos_ids, neg_ids) = (word_ids(&POSITIVE_WORDS), word_ids(&NEGATIVE_WORDS));
    let positive = SteeringCoefficients::of(0.9, 0.5, 1.0).as_array();
    let negative = SteeringCoefficients::of(-0.9, -0.5, 1.0).as_array();
    let layers = engine.steering_report().layers.unwrap_or_default();
    println!(
        "model {}: steered layers {}-{}; {} neutral prompts; margin = log P(positive words) - log P(negative words) for the next token",
        model_path.display(),
        layers[0],
        layers[1],
        NEUTRAL_PROMPTS.len()
    );
    println!("{:<58} {:>9} {:>12} {:>12}", "prompt", "off", "mood +0.9/+0.5", "mood -0.9/-0.5");
    let mut wins = 0;
    let (mut sum_pos, mut sum_neg, mut sum_off) = (0.0, 0.0, 0.0);
    let mut zero_equal = true;
    let mut max_zero_diff = 0f32;
    for prompt in NEUTRAL_PROMPTS {
        let margin = |engine: &mut Probe, c: Option<[f32; 4]>| -> anyhow::Result<(f64, Vec<f32>)> {
            engine.set_steering(c).map_err(anyhow::Error::msg)?;
            let logits = engine.next_token_logits(prompt).map_err(anyhow::Error::msg)?;
            Ok((log_softmax_at(&logits, &pos_ids) - log_softmax_at(&logits, &neg_ids), logits))
        };
        let (off, off_logits) = margin(&mut engine, None)?;
        let (_, zero_logits) = margin(&mut engine, Some([0.0; 4]))?;
        let diff = off_logits.iter().zip(&zero_logits).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        max_zero_diff = max_zero_diff.max(diff);
        zero_equal &= off_logits == zero_logits;
        let (pos, _) = margin(&mut engine, Some(positive))?;
        let (neg, _) = margin(&mut engine, Some(negative))?;
        if pos > neg {
            wins += 1;
        }
        sum_pos += pos;
        sum_neg += neg;
        sum_off += off;
        println!("{:<58} {:>9.3} {:>12.3} {:>12.3}", prompt, off, pos, neg);
    }
    let n = NEUTRAL_PROMPTS.len() as f64;
    println!(
        "mean margin: off {:.3}, positive mood {:.3}, negative mood {:.3}; larger under the positive mood for {}/{} prompts ({:.0} %)",
        sum_off / n,
        sum_pos / n,
        sum_neg / n,
        wins,
        NEUTRAL_PROMPTS.len(),
        100.0 * wins as f64 / n
    );
    println!(
        "strength 0 (all coefficients 0, vectors set) vs no control vector: logits {} (largest difference {max_zero_diff})",
        if zero_equal { "identical" } else { "DIFFER" }
    );
    drop(loaded);
    let (off, on) = crate::harness::bench::steering_speed(config)?;
    println!(
        "decode speed (128 tokens, one sequence, best of 3): steering off {off:.1} tok/s, on {on:.1} tok/s, ratio {:.3}",
        on / off
    );
    Ok(())
}
