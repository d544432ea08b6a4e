#!/usr/bin/env python3
"""A model of real dimensions with random weights, for a machine a real
model cannot reach (a lent GPU machine takes 64 MiB a call): written there
in seconds from a tokenizer carried in a few MiB. Its text is noise, but
every tensor has the real model's shape and type, so a step costs what the
real model's would.

    gpu-model.py vocab MODEL.gguf VOCAB.gguf      # keep MODEL's tokenizer only
    gpu-model.py build VOCAB.gguf OUT.gguf --shape llama-8b [--seed N]

Shapes: llama-8b (Llama 3.1 8B: Psyche's users' model, in Q4_K like its
Q4_K_M), qwen2-0.5b (Qwen2.5 0.5B: the default model's dimensions) and
tiny (a check on any machine). Matrices whose rows are a multiple of 256
are Q4_K, others Q8_0; norms are F32 ones. Needs numpy and llama.cpp's
`gguf` package (pinned in scripts/gpu-pack.sh).
"""

import argparse
import sys

import numpy as np
import gguf
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as V

# (architecture, embedding, layers, feed-forward, heads, kv heads, rope base, rms eps, context, qkv bias)
SHAPES = {
    "llama-8b": ("llama", 4096, 32, 14336, 32, 8, 500000.0, 1e-5, 131072, False),
    "qwen2-0.5b": ("qwen2", 896, 24, 4864, 14, 2, 1000000.0, 1e-6, 32768, True),
    "tiny": ("llama", 256, 2, 512, 4, 2, 10000.0, 1e-5, 32768, False),
}
# Weights with about this spread (as trained models' matrices have).
SPREAD = 0.02


def copy_tokenizer(path, writer):
    """Copy the `tokenizer.*` fields (vocabulary, merges, special tokens, chat
    template) of the GGUF at `path` into `writer`; the vocabulary's size."""
    n_vocab = 0
    for field in gguf.GGUFReader(path).fields.values():
        if not field.name.startswith("tokenizer."):
            continue
        main = field.types[0]
        value = field.contents()
        if main == V.ARRAY:
            writer.add_key_value(field.name, value, V.ARRAY, sub_type=field.types[-1])
            if field.name == "tokenizer.ggml.tokens":
                n_vocab = len(value)
        else:
            writer.add_key_value(field.name, value, main)
    assert n_vocab, f"{path} has no tokenizer.ggml.tokens"
    return n_vocab


def finish(writer):
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def keep_vocab(model_path, vocab_path):
    """Write a GGUF with `model_path`'s tokenizer (and chat template), no tensors."""
    writer = gguf.GGUFWriter(vocab_path, arch="vocab")
    n_vocab = copy_tokenizer(model_path, writer)
    finish(writer)
    print(f"gpu-model: the tokenizer of {model_path} ({n_vocab} tokens) in {vocab_path}", file=sys.stderr)


def q8_0_blocks(rng, n):
    """`n` Q8_0 blocks (a half-float scale, 32 signed bytes) of about SPREAD."""
    blocks = np.empty((n, 34), dtype=np.uint8)
    blocks[:, :2] = np.frombuffer(np.float16(SPREAD / 73.0).tobytes(), dtype=np.uint8)
    blocks[:, 2:] = rng.integers(0, 256, size=(n, 32), dtype=np.uint8)
    return blocks


def q4_k_blocks(rng, n):
    """`n` Q4_K blocks (super-scale and -min, twelve bytes of 6-bit sub-scales
    and mins, 128 bytes of nibbles) of about SPREAD: random sub-scales and
    nibbles, the mins' scale set so that a sub-block averages about zero."""
    blocks = np.empty((n, 144), dtype=np.uint8)
    d = SPREAD / (32.0 * 4.6)
    blocks[:, 0:2] = np.frombuffer(np.float16(d).tobytes(), dtype=np.uint8)
    blocks[:, 2:4] = np.frombuffer(np.float16(d * 7.5).tobytes(), dtype=np.uint8)
    blocks[:, 4:] = rng.integers(0, 256, size=(n, 140), dtype=np.uint8)
    return blocks


def matrix(rng, rows, cols, pool):
    """A rows x cols weight (ggml: `cols` per row) as raw quantized bytes.
    The blocks repeat a random pool: the values do not matter, the bytes
    read per step do, and tiling keeps an 8B model's writing to seconds."""
    qtype, size, make = (Q.Q4_K, 256, q4_k_blocks) if cols % 256 == 0 else (Q.Q8_0, 32, q8_0_blocks)
    assert cols % size == 0, f"a row of {cols} is not whole {qtype.name} blocks"
    if qtype not in pool:
        pool[qtype] = make(rng, 1 << 14)
    per_row = cols // size
    blocks = np.resize(pool[qtype], (rows * per_row, pool[qtype].shape[1]))
    return blocks.reshape(rows, -1), qtype


def build(vocab_path, out_path, shape, seed):
    arch, embd, layers, ff, heads, kv_heads, rope, eps, ctx, bias = SHAPES[shape]
    head = embd // heads
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(out_path, arch=arch)
    n_vocab = copy_tokenizer(vocab_path, writer)
    writer.add_name(f"random {shape} (elpis scripts/gpu-model.py, seed {seed})")
    writer.add_context_length(ctx)
    writer.add_embedding_length(embd)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ff)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(rope)
    writer.add_layer_norm_rms_eps(eps)
    writer.add_rope_dimension_count(head)
    writer.add_vocab_size(n_vocab)

    pool = {}

    def weight(name, rows, cols):
        data, qtype = matrix(rng, rows, cols, pool)
        writer.add_tensor(name, data, raw_dtype=qtype)

    ones = lambda n: np.ones(n, dtype=np.float32)  # noqa: E731
    weight("token_embd.weight", n_vocab, embd)
    for i in range(layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", ones(embd))
        weight(f"blk.{i}.attn_q.weight", heads * head, embd)
        weight(f"blk.{i}.attn_k.weight", kv_heads * head, embd)
        weight(f"blk.{i}.attn_v.weight", kv_heads * head, embd)
        if bias:
            for part, n in (("q", heads * head), ("k", kv_heads * head), ("v", kv_heads * head)):
                writer.add_tensor(f"blk.{i}.attn_{part}.bias", np.zeros(n, dtype=np.float32))
        weight(f"blk.{i}.attn_output.weight", embd, heads * head)
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", ones(embd))
        weight(f"blk.{i}.ffn_gate.weight", ff, embd)
        weight(f"blk.{i}.ffn_up.weight", ff, embd)
        weight(f"blk.{i}.ffn_down.weight", embd, ff)
    writer.add_tensor("output_norm.weight", ones(embd))
    weight("output.weight", n_vocab, embd)
    finish(writer)
    print(f"gpu-model: {out_path}: random {shape} ({arch}, {layers} layers, {embd} wide, vocab {n_vocab})", file=sys.stderr)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("vocab", help="keep a model's tokenizer only")
    v.add_argument("model")
    v.add_argument("out")
    b = sub.add_parser("build", help="a random-weight model of a named shape")
    b.add_argument("vocab")
    b.add_argument("out")
    b.add_argument("--shape", choices=sorted(SHAPES), default="llama-8b")
    b.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    if args.command == "vocab":
        keep_vocab(args.model, args.out)
    else:
        build(args.vocab, args.out, args.shape, args.seed)


if __name__ == "__main__":
    main()
