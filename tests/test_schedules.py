"""The schedules of a run, step by step: dynamic top-k (all six modes) and the learning rate.

The reference formulas are written here from their descriptions, not taken from the code under test:
the dynamic top-k of the SMoE-Dropout code (`calculate_gate_number`, read in its repository), and the
learning rate of train.py's documented recipe (linear warm-up lr (m + 1) / W for update m < W, then
CosineAnnealingLR over max_step evaluated at m).
"""
import glob
import math
import os

import numpy as np
import pytest

import train
from hyper_router import TOP_K_SCHEDULES, get_top_k, top_k_schedule

MULTI_STEPS = {'multi_step_increase': [1, 2, 4, 8, 16], 'multi_step_decrease': [16, 8, 4, 2, 1]}


def reference_top_k(step, mode, k_min, k_max, total):
    """The SMoE-Dropout code's k at `step`: numpy cosines, Python's round (half to even), np.clip at the end.

    The original indexes its multi-step list out of range from step `total` on; the list's last k is held.
    """
    if mode == 'linear_increase':
        k = round((k_max - k_min) * step / total) + k_min
    elif mode == 'linear_decrease':
        k = round((k_min - k_max) * step / total) + k_max
    elif mode == 'cosine_increase':
        k = round((k_min - k_max) * np.cos(np.pi * step / (2 * total))) + k_max
    elif mode == 'cosine_decrease':
        k = round((k_max - k_min) * np.cos(np.pi * step / (2 * total))) + k_min
    else:
        steps = MULTI_STEPS[mode]
        k = steps[min(int(len(steps) * step / total), len(steps) - 1)]
    return int(np.clip(k, k_min, k_max))


def test_the_reference_covers_every_mode_of_the_code():
    assert sorted(TOP_K_SCHEDULES) == sorted(['linear_increase', 'linear_decrease', 'cosine_increase',
                                              'cosine_decrease', *MULTI_STEPS])


# (k_min, k_max, total): the scripts' 8 -> 16; 1 -> 4 over 6 steps puts 0.5 and 1.5 on the rounding;
# 1 -> 16 over 7 steps lets every multi-step k through
@pytest.mark.parametrize('k_min,k_max,total', [(8, 16, 10), (1, 4, 6), (1, 16, 7), (2, 3, 4)])
@pytest.mark.parametrize('mode', TOP_K_SCHEDULES)
def test_top_k_schedule_at_every_step_equals_the_reference(mode, k_min, k_max, total):
    steps = range(total + 3)                        # past the end the schedule holds its last k
    assert [top_k_schedule(s, mode, k_min, k_max, total) for s in steps] == \
        [reference_top_k(s, mode, k_min, k_max, total) for s in steps]


def test_linear_increase_rounds_half_to_even_by_hand():
    # 3 * s / 6 = 0, 0.5, 1, 1.5, 2, 2.5, 3: round half to even gives 0, 0, 1, 2, 2, 2, 3
    assert [top_k_schedule(s, 'linear_increase', 1, 4, 6) for s in range(7)] == [1, 1, 2, 3, 3, 3, 4]


def test_the_k_schedule_spans_the_whole_run_unless_told_otherwise():
    assert train.parse_args(['--max_step', '7']).dynamic_overall_steps == 7
    assert train.parse_args(['--max_step', '7', '--dynamic_overall_steps', '3']).dynamic_overall_steps == 3


def reference_learning_rate(update, lr, warmup, max_step):
    """lr of update m (counted from 0): lr (m + 1) / W during the warm-up, then the cosine to 0 over max_step."""
    if update < warmup:
        return lr * (update + 1) / warmup
    return lr * 0.5 * (1 + math.cos(math.pi * update / max_step))


@pytest.mark.parametrize('warmup', [0, 3])
def test_learning_rate_function_at_every_step(warmup):
    args = train.parse_args(['--lr', '0.5', '--warmup_step', str(warmup), '--max_step', '9'])
    assert [train.learning_rate(m, args) for m in range(9)] == \
        pytest.approx([reference_learning_rate(m, 0.5, warmup, 9) for m in range(9)], rel=1e-12)



def test_a_short_run_routes_each_step_to_the_scheduled_k_and_updates_with_the_scheduled_lr(
        tmp_path, synthetic_dir, monkeypatch):
    """What train.py applies, recorded at each optimiser step (the logged k and lr are a step's aftermath)."""
    applied = []
    original = train.Trainer.train_step

    def recording(self, data, target):
        k = get_top_k(self.model)                            # the k this step's forward routes with
        loss = original(self, data, target)
        applied.append((self.step, k, self.optimizer.param_groups[0]['lr']))
        return loss

    monkeypatch.setattr(train.Trainer, 'train_step', recording)
    max_step, warmup, lr = 9, 3, 0.01
    work = str(tmp_path / 'runs')
    train.main(['--dataset', 'synthetic', '--data', synthetic_dir, '--work_dir', work, '--n_layer', '1',
                '--d_model', '16', '--n_head', '2', '--d_head', '8', '--d_inner', '16', '--tgt_len', '8',
                '--mem_len', '8', '--eval_tgt_len', '8', '--batch_size', '2', '--max_eval_steps', '1',
                '--eval_ks', '1', '--moe', '--moe-num-expert', '4', '--gate_name', 'CustomNaiveGate',
                '--freeze_gate', '--dynamic_moe', '--moe-top-k-min', '1', '--moe-top-k-max', '4',
                '--dynamic_overall_steps', '6', '--max_step', str(max_step), '--eval-interval', str(max_step),
                '--warmup_step', str(warmup), '--lr', str(lr)])
    assert glob.glob(os.path.join(f'{work}-synthetic', '*', 'results.json'))
    assert [step for step, _, _ in applied] == list(range(max_step))
    assert [k for _, k, _ in applied] == [reference_top_k(m, 'linear_increase', 1, 4, 6) for m in range(max_step)]
    assert [k for _, k, _ in applied] == [1, 1, 2, 3, 3, 3, 4, 4, 4]
    assert [rate for _, _, rate in applied] == \
        pytest.approx([reference_learning_rate(m, lr, warmup, max_step) for m in range(max_step)], rel=1e-12)
