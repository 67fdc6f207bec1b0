"""Tiny random models and a tokenizer, built offline, shared by the tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from postgres import postgres_url  # noqa: F401  (the PostgreSQL server fixture)

from prunella.data import shipped_path

VOCAB = 384
HIDDEN = 64
FFN = 128


def tiny_config(family: str):
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_attention_heads=4)
    if family in ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3"):
        cls = {
            "llama": tf.LlamaConfig,
            "mistral": tf.MistralConfig,
            "qwen2": tf.Qwen2Config,
            "qwen3": tf.Qwen3Config,
            "gemma": tf.GemmaConfig,
            "phi3": tf.Phi3Config,
        }[family]
        extra = dict(head_dim=16) if family in ("gemma", "qwen3") else {}
        return cls(
            **common,
            **extra,
            intermediate_size=FFN,
            num_hidden_layers=3,
            num_key_value_heads=2,
            max_position_embeddings=512,
            tie_word_embeddings=False,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
    if family == "opt":
        return tf.OPTConfig(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            num_attention_heads=4,
            ffn_dim=FFN,
            num_hidden_layers=3,
            max_position_embeddings=512,
            word_embed_proj_dim=HIDDEN,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
    if family == "gpt2":
        return tf.GPT2Config(
            vocab_size=VOCAB,
            n_embd=HIDDEN,
            n_head=4,
            n_layer=3,
            n_positions=512,
            n_inner=FFN,
            bos_token_id=1,
            eos_token_id=2,
        )
    if family == "gpt_neox":
        return tf.GPTNeoXConfig(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            num_attention_heads=4,
            intermediate_size=FFN,
            num_hidden_layers=3,
            max_position_embeddings=512,
            bos_token_id=1,
            eos_token_id=2,
        )
    return generic_config(family)


# the sizes above, as every config of the installed transformers takes them; the
# family's own defaults otherwise (tied embeddings, sliding windows, QK-norms, ...)
GENERIC = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    intermediate_size=FFN,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=512,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
MOE = dict(
    num_experts=4,
    num_local_experts=4,
    n_routed_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=64,
)
EXTRA = {
    "gptj": dict(rotary_dim=8),
    "codegen": dict(rotary_dim=8),
    "falcon": dict(head_dim=None),  # derived from hidden / heads
    # multi-head latent attention; block 0 dense, the others mixtures of experts
    "deepseek_v3": dict(
        head_dim=None,
        kv_lora_rank=16,
        q_lora_rank=24,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=16,
        first_k_dense_replace=1,
        n_group=1,
        topk_group=1,
        **MOE,
    ),
    "gemma2": dict(sliding_window=16),
    "gemma3_text": dict(sliding_window=16),  # local and global layers
    **{family: MOE for family in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "granitemoe")},
    **{family: MOE for family in ("gpt_oss", "llama4_text")},
}


def generic_config(family: str):
    from transformers import AutoConfig

    options = {**GENERIC, **EXTRA.get(family, {})}
    return AutoConfig.for_model(family, **{k: v for k, v in options.items() if v is not None})


# mixtures of experts (fused 3-D experts; DeepSeek-V3 after a dense block; Llama 4's
# experts scaled by the router at their input)
MOE_FAMILIES = [
    *["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "granitemoe", "gpt_oss", "deepseek_v3"],
    "llama4_text",
]
# every family is pruned, saved and reloaded, in memory and streamed (test_families,
# test_resume): 38 model types of the installed transformers
FAMILIES = [
    *["llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "opt", "gpt2", "gpt_neox"],
    *["gemma2", "gemma3_text", "phi", "olmo", "olmo2", "olmo3", "granite", "cohere", "cohere2"],
    *["starcoder2", "falcon", "bloom", "stablelm", "gptj", "codegen", "mpt", "helium"],
    *["exaone4", "smollm3", "glm", "ministral"],
    *MOE_FAMILIES,
]


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer trained on the shipped sample (offline, < 1 s)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train([str(shipped_path("sample"))], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    path = tmp_path_factory.mktemp("tokenizer")
    fast.save_pretrained(path)
    return path


def build_checkpoint(
    path: Path, family: str, tokenizer_dir: Path, seed: int = 0, dtype: torch.dtype = torch.float32
) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family)).to(dtype)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, tokenizer_dir) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("tiny-llama"), "llama", tokenizer_dir)


def install_package(files: dict[str, str], root: Path) -> dict[str, str]:
    """Install a package made of ``files`` (path -> text, dedented) for real, into a folder
    of ``root``; returns an environment whose Python finds it (and its entry points)."""
    import subprocess
    import sys
    import textwrap

    package, site = root / "pkg", root / "site"
    for name, text in files.items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(textwrap.dedent(text))
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(site), str(package)],
        check=True, capture_output=True,
    )  # fmt: skip
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), *sys.path])}


def hand_evaluation(path: Path, seqlen: int, max_windows: int, reference: Path | None = None):
    """Perplexity (and KL to ``reference``) of the checkpoint at ``path`` on the shipped
    sample-eval text, computed without prunella's evaluation: transformers' own
    next-token loss per window (all windows have ``seqlen - 1`` predicted tokens) and
    torch's ``kl_div``. Returns ``(perplexity, kl)``."""
    import math

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prunella.data import evaluation_windows

    windows = evaluation_windows(AutoTokenizer.from_pretrained(path), "sample-eval", seqlen,
                                 max_windows)  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ref = None
    if reference is not None:
        ref = AutoModelForCausalLM.from_pretrained(reference, dtype=torch.float32).eval()
    losses, kls = [], []
    with torch.no_grad():
        for ids in windows.long():
            out = model(input_ids=ids[None], labels=ids[None])
            losses.append(out.loss.item())
            if ref is not None:
                logp = out.logits[0, :-1].float().log_softmax(-1)
                ref_logp = ref(input_ids=ids[None]).logits[0, :-1].float().log_softmax(-1)
                kls.append(
                    torch.nn.functional.kl_div(
                        logp, ref_logp, log_target=True, reduction="batchmean"
                    ).item()
                )
    kl = sum(kls) / len(kls) if kls else None
    return math.exp(sum(losses) / len(losses)), kl
