"""The embedded tiny policy: a character-level tokenizer and a small Llama, made on the spot.

Nothing is downloaded.  The tokenizer is a ``PreTrainedTokenizerFast`` over printable ASCII
plus one token for ``\\boxed{``, so it saves and reloads with ``AutoTokenizer`` like any other.
"""
from __future__ import annotations

import string

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
BOXED_TOKEN = "\\boxed{"


def build_toy_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(string.printable) - set("\t\r\x0b\x0c"))
    vocab = {tok: i for i, tok in enumerate([PAD, EOS, UNK, BOXED_TOKEN] + chars)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(
        Regex(r"\\boxed\{|[\s\S]"), behavior="isolated"
    )
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=PAD, eos_token=EOS, unk_token=UNK,
        padding_side="left",
    )


def build_toy_model(tokenizer, hidden_size: int, layers: int, heads: int, seed: int):
    """A randomly initialised Llama (float32, no dropout), identical for identical arguments."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)
