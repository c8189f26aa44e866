"""An independent float64 NumPy Llama forward (plain loops over heads), for tests only."""

import numpy as np


def _rms(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _inv_freq(cfg):
    d = cfg.head_dim
    inv = 1.0 / cfg.rope_theta ** (np.arange(0, d, 2) / d)
    rs = cfg.rope_scaling
    if rs is None:
        return inv
    out = []
    for f in inv:  # Llama 3.1 rule written per frequency
        wavelen = 2 * np.pi / f
        if wavelen < rs.original_max_position_embeddings / rs.high_freq_factor:
            out.append(f)
        elif wavelen > rs.original_max_position_embeddings / rs.low_freq_factor:
            out.append(f / rs.factor)
        else:
            s = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
            out.append((1 - s) * f / rs.factor + s * f)
    return np.array(out)


def _rope(x, pos, inv):  # x [T, heads, D]
    half = x.shape[-1] // 2
    out = np.empty_like(x)
    for t in range(x.shape[0]):
        c, s = np.cos(pos[t] * inv), np.sin(pos[t] * inv)
        a, b = x[t, :, :half], x[t, :, half:]
        out[t, :, :half] = a * c - b * s
        out[t, :, half:] = b * c + a * s
    return out


def forward(params, tokens, cfg):
    """tokens [T] -> logits [T, V] in float64."""
    p = {k: (np.asarray(v, np.float64) if not isinstance(v, dict) else {kk: np.asarray(vv, np.float64) for kk, vv in v.items()}) for k, v in params.items()}
    T = len(tokens)
    x = p["embed"][tokens]
    inv = _inv_freq(cfg)
    g = cfg.num_heads // cfg.num_kv_heads
    pos = np.arange(T)
    for i in range(cfg.num_layers):
        lp = {k: v[i] for k, v in p["layers"].items()}
        h = _rms(x, lp["attn_norm"], cfg.rms_norm_eps)
        q, k, v = h @ lp["wq"], h @ lp["wk"], h @ lp["wv"]
        if cfg.attention_bias:
            q, k, v = q + lp["bq"], k + lp["bk"], v + lp["bv"]
        q = _rope(q.reshape(T, cfg.num_heads, cfg.head_dim), pos, inv)
        k = _rope(k.reshape(T, cfg.num_kv_heads, cfg.head_dim), pos, inv)
        v = v.reshape(T, cfg.num_kv_heads, cfg.head_dim)
        o = np.zeros((T, cfg.num_heads, cfg.head_dim))
        for hd in range(cfg.num_heads):
            kv = hd // g
            s = q[:, hd] @ k[:, kv].T / np.sqrt(cfg.head_dim)
            s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
            s = np.exp(s - s.max(-1, keepdims=True))
            o[:, hd] = (s / s.sum(-1, keepdims=True)) @ v[:, kv]
        x = x + o.reshape(T, -1) @ lp["wo"]
        h = _rms(x, lp["mlp_norm"], cfg.rms_norm_eps)
        gate = h @ lp["w_gate"]
        x = x + (gate / (1 + np.exp(-gate)) * (h @ lp["w_up"])) @ lp["w_down"]
    x = _rms(x, p["final_norm"], cfg.rms_norm_eps)
    head = p["embed"].T if cfg.tie_word_embeddings else p["lm_head"]
    return x @ head
