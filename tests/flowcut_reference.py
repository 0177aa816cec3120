"""An independent FlowCut reference for the tests (paper and official code, no tokenprune code): the CLIP
layers written out with an eager attention map, the scores and the schedule in float64."""

import math

import torch


def sharpen_vision_attention(model, factor=4.0):
    """Scale every vision layer's q/k projections: peaked [CLS] rows (low entropy), as in trained towers, so the
    entropy-adaptive schedule prunes before the forced final step (random towers attend almost uniformly)."""
    with torch.no_grad():
        for layer in model.model.vision_tower.encoder.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                proj.weight.mul_(factor)
                proj.bias.mul_(factor)


def flowcut_reference(model, pixel_values, k):
    """``(features [k, D] after the projector, kept original patch indices, tokens per layer)`` of ONE image
    ``pixel_values [3, H, W]`` at the model's feature layer (``hidden_states[-2]`` = output of layer L-2)."""
    tower = model.model.vision_tower
    layers = tower.encoder.layers
    select = len(layers) + 1 + model.config.vision_feature_layer - 1  # 0-based layer whose output is read
    target, cumulative, lengths = k + 1, None, []
    with torch.no_grad():
        h = tower.pre_layrnorm(tower.embeddings(pixel_values[None]))[0]  # [T, Dv]
        index = torch.arange(h.shape[0] - 1)
        for idx in range(select + 1):
            layer, attn = layers[idx], layers[idx].self_attn
            t, heads, d = h.shape[0], attn.num_heads, attn.head_dim
            lengths.append(t)
            x = layer.layer_norm1(h)
            q, key, v = (p(x).view(t, heads, d).transpose(0, 1) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
            weights = torch.softmax(q @ key.transpose(-1, -2) * d**-0.5, dim=-1)  # [H, T, T] eager attention map
            h = h + attn.out_proj((weights @ v).transpose(0, 1).reshape(t, heads * d))
            h = h + layer.mlp(layer.layer_norm2(h))
            remaining = select - idx - 1
            if remaining < 0 or t <= target:
                continue
            w, v64 = weights.double(), v.double()
            cls_attn = w[:, 0, 1:].mean(0)  # head-mean [CLS] row, patch columns
            semantic = torch.softmax(v64[:, :1] @ v64.transpose(-1, -2), dim=-1)[:, 0, 1:].mean(0)
            value_l1 = v64.mean(0)[1:].abs().sum(-1)
            score = (cls_attn / cls_attn.sum() + semantic / semantic.sum()) * value_l1
            cumulative = score if cumulative is None else 0.5 * cumulative + 0.5 * score
            if remaining % 2:
                continue
            if remaining == 0:
                new_length = target
            else:
                p = cls_attn / cls_attn.sum()
                ratio = float(-(p * p.log()).sum()) / math.log(t - 1)
                prune = round((t - 1 - (target - 1)) / math.sqrt(remaining) * (1 - ratio**2))
                new_length = max(t - prune, target)
            top = torch.argsort(cumulative, descending=True, stable=True)[: new_length - 1].sort().values
            h, cumulative, index = torch.cat([h[:1], h[1 + top]]), cumulative[top], index[top]
        return model.model.multi_modal_projector(h[1:]), index, lengths
