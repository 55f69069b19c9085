"""Per-request sampling parameters and the on-device sampler (the engine jits it as its own call
after each forward, in the mode the rows need: `sampling_mode`).

Each row of a batch carries its own temperature, top_p, top_k, seed and step; the sampler turns
logits [B, V] into token ids [B] on the device, so only B int32s come back to the host per step.
Randomness is a pure function of (seed, step): key = fold_in(key(seed), step). The same request
therefore samples the same tokens whatever else is in the batch, and a seeded request is
reproducible across runs.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P


LOGPROBS_MAX = 20   # most alternatives a request may ask for (OpenAI's top_logprobs and vLLM's cap)


@dataclasses.dataclass
class SamplingParams:
    """How one request generates. temperature 0 is greedy; top_k <= 0 and top_p = 1 are off.

    temperature / top_p / top_k / repetition_penalty left None take the checkpoint's
    generation_config.json values (as vLLM and SGLang do), else 1.0 / 1.0 / off / 1.0 (off). `max_tokens` None means "up to the context
    length"; `seed` None draws a fresh seed.
    `stop` strings end generation and are not included in the text; `stop_token_ids` and the
    checkpoint's EOS ids (unless `ignore_eos`) end it too.
    `logprobs` N (0..LOGPROBS_MAX): each generated token comes with its log-probability and the N
    most likely tokens' (vLLM's meaning); None returns none and costs nothing.
    `prompt_logprobs` N (0..LOGPROBS_MAX): each prompt token after the first comes with its
    log-probability given the ones before it and the N most likely tokens' there (vLLM's
    meaning); the whole prompt is prefilled then, none of it taken from the prefix cache.
    `presence_penalty` / `frequency_penalty` (OpenAI's, in [-2, 2]): each step's logits lose
    presence x [token generated before] + frequency x (times generated before), prompt excluded.
    `repetition_penalty` (in (0, 2], 1 is off; transformers' and vLLM's): first, the logit of
    every token seen in the prompt or generated is divided by it where positive, multiplied where
    negative.
    `json_schema` (a JSON schema, as a dict or its text) or `regex` (SGLang's names): every token
    keeps the text a prefix of a match (serve/structured.py); once the match is whole only an
    EOS id remains, unless `ignore_eos`, where generation ends at max_tokens.
    `constraint_after` (a token id): the constraint starts after that token is generated, the
    tokens before it (a thinking model's reasoning, ended by </think>) free.
    `min_tokens` (vLLM's): the first min_tokens generated tokens are never an EOS or stop id (their
    logits are masked), and stop strings are looked for only in the text after them.
    """

    max_tokens: int | None = 16
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: list[str] = dataclasses.field(default_factory=list)
    stop_token_ids: list[int] = dataclasses.field(default_factory=list)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float | None = None
    json_schema: str | dict | None = None
    regex: str | None = None
    constraint_after: int | None = None
    min_tokens: int = 0

    @property
    def constraint(self) -> tuple[str, str] | None:
        """(kind, text) of the structured-output constraint ('json_schema' / 'regex'), or None."""
        from .structured import json_schema_text

        if self.json_schema is not None:
            return "json_schema", json_schema_text(self.json_schema)
        return None if self.regex is None else ("regex", self.regex)

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty not in (None, 1))

    def validate(self):
        """Raise ValueError naming the field and the allowed range."""
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.temperature is not None and self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not 0 <= self.seed < 2 ** 63:
            raise ValueError(f"seed must be a non-negative integer below 2**63, got {self.seed}")
        for name in ("logprobs", "prompt_logprobs"):
            n = getattr(self, name)
            if n is not None and not 0 <= n <= LOGPROBS_MAX:
                raise ValueError(f"{name} must be in [0, {LOGPROBS_MAX}] (alternatives per token), got {n}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if self.repetition_penalty is not None and not 0 < self.repetition_penalty <= 2:
            raise ValueError(f"repetition_penalty must be in (0, 2] (1 is off), got {self.repetition_penalty}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")
        if self.json_schema is not None and self.regex is not None:
            raise ValueError("json_schema and regex both constrain the output; give one of them")
        if self.regex is not None and (not isinstance(self.regex, str) or not self.regex):
            raise ValueError("regex must be a non-empty string (a regular expression the output must match)")
        if self.json_schema is not None:
            from .structured import json_schema_text
            json_schema_text(self.json_schema)   # a ValueError naming the problem
        if not 0 <= self.min_tokens <= (self.max_tokens or self.min_tokens):
            raise ValueError(f"min_tokens must be in [0, max_tokens = {self.max_tokens}], got {self.min_tokens}")
        if self.constraint_after is not None and (not isinstance(self.constraint_after, int) or self.constraint_after < 0):
            raise ValueError(f"constraint_after must be a token id (a non-negative integer), got {self.constraint_after!r}")
        return self

    def resolved(self, defaults: dict) -> "SamplingParams":
        """A copy with unset temperature/top_p/top_k/repetition_penalty taken from `defaults`, then
        1.0 / 1.0 / -1 / 1.0."""
        fallback = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "repetition_penalty": 1.0}
        fill = {k: defaults.get(k, v) if getattr(self, k) is None else getattr(self, k) for k, v in fallback.items()}
        return dataclasses.replace(self, stop=list(self.stop), stop_token_ids=list(self.stop_token_ids), **fill)


def mask_words(vocab_size: int) -> int:
    """W: int32 words of one row's logits mask (a bit per token)."""
    return -(-vocab_size // 32)


def mask_logits(logits_bv, words_bw):
    """Structured outputs and min_tokens: logits [B, V] with every token whose bit is clear in
    words [B, W = mask_words(V)] int32 (bit i % 32 of word i // 32) set to -inf; an all-ones row
    leaves its logits as they are. Elementwise over V, so logits split over the vocabulary stay
    split."""
    v = logits_bv.shape[-1]
    ids = jnp.arange(v, dtype=jnp.int32)
    word = jnp.take(words_bw, ids // 32, axis=1)                           # [B, V]
    allowed = jax.lax.shift_right_logical(word, jnp.broadcast_to(ids % 32, word.shape)) & 1
    return jnp.where(allowed.astype(bool), logits_bv, -jnp.inf)


def device_seed(seed: int) -> np.int32:
    """Fold a 63-bit user seed into the int32 a PRNG key is built from (same seed, same key)."""
    folded = (seed ^ (seed >> 31) ^ (seed >> 62)) & 0x7FFFFFFF
    return np.int32(folded)


TOP_K_FAST = 64  # rows all asking top_k <= this are sampled from a top_k(64) instead of a full sort


def vocab_axes(ctx, shape) -> tuple[str, ...]:
    """The mesh axes that split the vocabulary of logits [B, V] (none on one device or where the
    mesh does not divide V)."""
    from qwen3_jax.kernels.sharded import mesh_axes_of

    return () if ctx is None else mesh_axes_of(ctx, ("batch", "vocab"), shape, (1,))


# How the top-64 sampler takes a row's best 64 (read at trace time; benchmarks set it): "pruned"
# (top_k_rows) or "lax", one jax.lax.top_k over the row. Measured in runs 105-107
# (benchmarks/top_k.py, benchmarks/NOTES.md), where XLA's top_k over 1024-column chunks and a
# Pallas kernel selecting by rounds of max / arg-max both lost to "pruned" everywhere.
TOP_K_FORMS = ("pruned", "lax")
TOP_K = "pruned"
TOP_K_BLOCK = 64   # columns per block of the pruned form


def total_order_key(x):
    """float32 -> int32 in XLA's total order of floats (what lax.top_k and sort compare: -NaN <
    -inf < finite < inf < NaN, and -0.0 < 0.0): the bits, with the magnitude bits of negatives
    flipped."""
    bits = jax.lax.bitcast_convert_type(x, jnp.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def top_k_rows(x_bv, width: int, form: str | None = None, block: int | None = None):
    """jax.lax.top_k(x, width) -> (values, ids) [B, width], exactly (ties to the lower id).

    form "pruned" (default TOP_K): the row's `block`-column blocks' maxima (default TOP_K_BLOCK);
    the `width` blocks with the best maxima hold the row's best `width` (any other block's maximum
    is at or below the width-th best block maximum, and `width` values reach it), so one top_k
    over those width x block columns, taken in id order, gives the answer. Maxima compare in XLA's
    total order (total_order_key), as top_k does. Where tied block maxima leave blocks out, those
    blocks lie after every chosen one of that maximum, so the lower ids are kept. The last block
    is padded with -inf at ids past V, after every real entry, so a pad is never picked while
    V >= width. form "lax": one jax.lax.top_k over the whole row.

    Why: XLA:GPU lowers a top_k with k = 64 over a 152k vocabulary to a sort of the whole row: 38
    us a row at B = 16 on an H200, where reading the row takes ~0.3 us; pruned takes 4 us a row
    there and 0.7 at B = 256 (runs 105-107)."""
    b, v = x_bv.shape
    form = TOP_K if form is None else form
    if form not in TOP_K_FORMS:
        raise ValueError(f"top-k form {form!r}: use one of {TOP_K_FORMS}")
    block = TOP_K_BLOCK if block is None else block
    n = -(-v // block)
    if form == "lax" or n <= width:
        return jax.lax.top_k(x_bv, width)
    blocks_bns = jnp.pad(x_bv, ((0, 0), (0, n * block - v)), constant_values=-jnp.inf).reshape(b, n, block)
    _, best = jax.lax.top_k(jnp.max(total_order_key(blocks_bns), axis=2), width)    # [B, width]
    best = jnp.sort(best, axis=1)                                                    # id order
    cand = jnp.take_along_axis(blocks_bns, best[:, :, None], axis=1).reshape(b, width * block)
    vals, at = jax.lax.top_k(cand, width)
    return vals, jnp.take_along_axis(best, at // block, axis=1) * block + at % block


def top_k_over_vocab(x_bv, width: int, ctx=None):
    """jax.lax.top_k(x, width) -> (values, ids) [B, width]. Where the vocabulary is split over
    devices (the engine keeps the forward's logits so), each device takes its own best `width`
    first and the best `width` of those gathered candidates are the answer: exact, since a row's
    best `width` are among them, with ties to the lower id as lax.top_k. [B, width x shards]
    cross devices instead of the whole [B, V] row (XLA's partitioning of top_k gathers it)."""
    axes = vocab_axes(ctx, x_bv.shape)
    shards = 1 if not axes else int(np.prod([ctx.mesh.shape[a] for a in axes]))
    if shards == 1 or x_bv.shape[1] // shards < width:
        return top_k_rows(x_bv, width)

    def local(part):
        vals, ids = top_k_rows(part, width)
        ids = ids + jax.lax.axis_index(axes) * part.shape[1]
        vals = jax.lax.all_gather(vals, axes, axis=1, tiled=True)   # shard order: ids ascending by shard
        ids = jax.lax.all_gather(ids, axes, axis=1, tiled=True)
        best, at = jax.lax.top_k(vals, width)
        return best, jnp.take_along_axis(ids, at, axis=1)

    return jax.shard_map(local, mesh=ctx.mesh, in_specs=P(None, axes), out_specs=(P(), P()),
                         check_vma=False)(x_bv)


def _sample_rows(logits_bv, temperature_b, top_p_b, top_k_b, seed_b, step_b, width: int, ctx=None):
    """Temperature, then top-k, then top-p (each renormalizing, as transformers' warpers do),
    then one categorical draw per row, over the `width` best logits (width = V: all of them)."""
    b, v = logits_bv.shape
    t = jnp.where(temperature_b > 0, temperature_b, 1.0)
    scaled = logits_bv / t[:, None]
    if width < v:
        sorted_logits, idx = top_k_over_vocab(scaled, width, ctx)
    else:
        order = jnp.broadcast_to(jnp.arange(v, dtype=jnp.int32), (b, v))
        neg_sorted, idx = jax.lax.sort((-scaled, order), dimension=1, num_keys=1)
        sorted_logits = -neg_sorted  # descending
    rank = jnp.arange(width, dtype=jnp.int32)[None, :]
    k = jnp.where(top_k_b > 0, top_k_b, v)
    masked = jnp.where(rank < k[:, None], sorted_logits, -jnp.inf)
    probs = jax.nn.softmax(masked, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly better tokens
    masked = jnp.where(before < top_p_b[:, None], masked, -jnp.inf)  # rank 0 always stays

    def draw(seed, step, row):
        key = jax.random.fold_in(jax.random.key(seed), step)
        return jax.random.categorical(key, row)

    choice = jax.vmap(draw)(seed_b, step_b, masked)
    return jnp.take_along_axis(idx, choice[:, None], axis=1)[:, 0].astype(jnp.int32)


SAMPLING_MODES = ("greedy", "top64", "full")


def sampling_mode(temperature_b, top_k_b) -> str:
    """The cheapest exact sampler for these rows (host arrays [B]): 'greedy' when no row samples,
    'top64' when every sampling row has 0 < top_k <= 64, else 'full' (a row sorts the vocabulary)."""
    sampling = np.asarray(temperature_b) > 0
    if not sampling.any():
        return "greedy"
    k = np.asarray(top_k_b)[sampling]
    return "top64" if ((k > 0) & (k <= TOP_K_FAST)).all() else "full"


def sample(logits_bv, temperature_b, top_p_b, top_k_b, seed_b, step_b, mode: str, ctx=None):
    """logits float32 [B, V] + per-row params [B] -> token ids int32 [B]. `ctx` (the model's
    ShardingContext, static): the vocabulary may be split over its devices (top_k_over_vocab).

    Greedy rows (temperature 0) are the plain argmax. When every sampling row has 0 < top_k <= 64
    (Qwen3's generation_config asks top_k=20) the candidates come from lax.top_k(64), exact for
    those rows and far cheaper than sorting a 152k vocabulary; otherwise the whole row is sorted.

    `mode` (one of SAMPLING_MODES, static) is which of those paths compiles: `sampling_mode` picks
    it on the host from the rows' settings. Not on the device: a lax.switch there made XLA:GPU
    copy the branch index to the host and block until the device reached it, so a step's launch
    only returned once its forward had run (run 76 in benchmarks/NOTES.md).
    """
    if mode not in SAMPLING_MODES:
        raise ValueError(f"sampling mode {mode!r}: use one of {SAMPLING_MODES} (sampling_mode picks it)")
    greedy = jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    if mode == "greedy":
        return greedy
    v = logits_bv.shape[-1]
    width = min(TOP_K_FAST, v) if mode == "top64" else v
    drawn = _sample_rows(logits_bv, temperature_b, top_p_b, top_k_b, seed_b, step_b, width=width, ctx=ctx)
    return jnp.where(temperature_b > 0, drawn, greedy)


def token_logprobs(logits_bv, ids_b, ctx=None):
    """Log-probabilities of the model's distribution (before penalties, temperature, top-k and
    top-p, as vLLM returns by default) -> (logprob of ids_b [B], top ids [B, LOGPROBS_MAX], their logprobs).

    Reductions only over the vocabulary (a logsumexp, a select-and-sum for the chosen id),
    so logits split over devices stay split; the top ids come from top_k_over_vocab."""
    b, v = logits_bv.shape
    lse_b = jax.nn.logsumexp(logits_bv, axis=1)
    hit = jnp.arange(v, dtype=jnp.int32)[None, :] == ids_b[:, None]
    chosen_b = jnp.sum(jnp.where(hit, logits_bv, 0.0), axis=1) - lse_b
    top, top_ids = top_k_over_vocab(logits_bv, min(LOGPROBS_MAX, v), ctx)
    return chosen_b, top_ids.astype(jnp.int32), top - lse_b[:, None]


# A slot's counts [V] hold how often each token was generated (the low bits) and, on the tokens
# of its prompt, this flag (set for requests with a repetition penalty).
PROMPT_FLAG = 1 << 30


def penalize(logits_bv, counts_bv, presence_b, frequency_b, repetition_b):
    """The penalties in vLLM's order: repetition [B] on every token seen (counts [B, V] nonzero:
    generated, or flagged PROMPT_FLAG as in the prompt), dividing positive logits [B, V] and
    multiplying negative ones; then OpenAI's, - frequency [B] x times generated - presence [B] x
    [generated]. Rows with no penalty come back unchanged. Elementwise, so logits split over the
    vocabulary stay split."""
    r = repetition_b[:, None]
    logits_bv = jnp.where(counts_bv != 0, jnp.where(logits_bv > 0, logits_bv / r, logits_bv * r), logits_bv)
    generated = counts_bv & (PROMPT_FLAG - 1)
    c = generated.astype(logits_bv.dtype)
    return logits_bv - frequency_b[:, None] * c - presence_b[:, None] * (generated > 0).astype(logits_bv.dtype)
