"""A plainly written batch-1 LLaDA generate loop (greedy, low-confidence remasking), written independently
of the engine to check it token for token. Follows LLaDA's generate.py: full-sequence logits, confidence
-inf outside the current block, top-k per step from the even split of the block's masks over its steps.
Ties go to the lowest position, the rule the engine documents."""
import torch


def llada_generate(model, prompt, gen_length, block_size, steps, mask_id):
    x = torch.full((1, len(prompt) + gen_length), mask_id, dtype=torch.long)
    x[0, :len(prompt)] = torch.tensor(prompt)
    num_blocks = gen_length // block_size
    steps_per_block = steps // num_blocks
    for b in range(num_blocks):
        start = len(prompt) + b * block_size
        stop = start + block_size
        n_masked = int((x[0, start:stop] == mask_id).sum())
        k_per_step = [n_masked // steps_per_block + (1 if i < n_masked % steps_per_block else 0)
                      for i in range(steps_per_block)]
        for k in k_per_step:
            mask_index = x == mask_id
            logits = model(x)
            x0 = torch.argmax(logits, dim=-1)
            p = torch.softmax(logits.to(torch.float64), dim=-1)
            x0_p = torch.gather(p, -1, x0.unsqueeze(-1)).squeeze(-1)
            x0_p[:, stop:] = float("-inf")
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, torch.tensor(float("-inf"), dtype=torch.float64))
            order = torch.sort(confidence[0], descending=True, stable=True).indices
            chosen = order[:k]
            x[0, chosen] = x0[0, chosen]
    return x[0, len(prompt):].tolist()
