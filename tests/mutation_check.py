"""Deliberate-bug check: does the test suite notice small wrong changes to the formulas a reproduction stands on?

    python tests/mutation_check.py                 # every mutation (several minutes on 2 cores)
    python tests/mutation_check.py --list          # the mutations and the tests that should catch each
    python tests/mutation_check.py --only NAME[,NAME...]

Each mutation replaces one exact piece of one line (it must occur exactly once in its file) in a temporary
copy of the repository (the files git knows, committed or not), runs `python -m pytest -q -x SELECTOR` there,
and counts as caught when that run fails. The selectors are first run on the unchanged copy, which must
pass. Prints a table and exits with status 1 when a mutation is missed. The list below covers the protocol,
data, schedules, objectives, scripts and analyses; tests/fixtures/mutations_a.txt (one mutation a line,
`name | file | original | mutated | selector`) adds those of the Transformer-XL and MoE references.
Not part of the default suite: it runs the selected tests once per mutation.
"""
import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MORE_MUTATIONS = os.path.join('tests', 'fixtures', 'mutations_a.txt')
DATA_TESTS = 'tests/test_data.py -k "not get_data_script"'
SCRIPT_SETTINGS = ('tests/test_scripts.py -k "test_script_carries or test_script_dropout_is or test_script_header or '
                   'test_every_pretraining"')
GPU_BF16 = 'tests/test_gpu_path.py -k bf16'
GPU_HOST_READS = 'tests/test_gpu_path.py -k "reads_nothing or loop_engine_reads"'
GPU_ENGINE = 'tests/test_gpu_path.py -k "capability or compile_on_cuda or fastmoe"'
NON_FINITE = 'tests/test_train.py tests/test_reliability.py -k non_finite'
PAPER_ANALYSES = 'tests/test_analysis.py -k "papers_model or table_a4 or entropy or spectrum or overlap or rank"'


class Mutation(NamedTuple):
    name: str
    file: str
    original: str
    mutated: str
    selector: str


MUTATIONS = [
    # evaluation protocol (evaluation.py) and the metric
    Mutation('eval_memory_is_mem_len', 'evaluation.py', "args['ext_len'], args['mem_len'] + extra",
             "args['ext_len'], args['mem_len']", 'tests/test_protocol.py'),
    Mutation('eval_mean_of_window_means', 'evaluation.py', 'total_loss += loss.double().sum().item()',
             'total_loss += loss.double().mean().item(); total_tokens += 1 - loss.numel()', 'tests/test_protocol.py'),
    Mutation('eval_batch_11', 'evaluation.py', 'EVAL_BATCH_SIZE = 10', 'EVAL_BATCH_SIZE = 11', 'tests/test_protocol.py'),
    Mutation('eval_windows_of_tgt_len', 'evaluation.py', "ckpt['args']['eval_tgt_len'], device=device",
             "ckpt['args']['tgt_len'], device=device", 'tests/test_protocol.py'),
    Mutation('bpc_in_log10', 'data_utils.py', 'return loss / math.log(2)', 'return loss / math.log(10)',
             'tests/test_protocol.py'),
    Mutation('ppl_in_base_2', 'data_utils.py', 'return math.exp(loss) if loss < 700', 'return 2 ** loss if loss < 700',
             DATA_TESTS),
    # data preparation defaults, vocabulary, synthetic corpus
    Mutation('get_data_holds_out_4m', 'data_utils.py', "'--n_test', type=int, default=5_000_000",
             "'--n_test', type=int, default=4_000_000", DATA_TESTS),
    Mutation('prep_enwik8_holds_out_4m', 'data_utils.py', 'def prep_enwik8(raw_bytes, n_test=5_000_000):',
             'def prep_enwik8(raw_bytes, n_test=4_000_000):', DATA_TESTS),
    Mutation('prep_text8_holds_out_4m', 'data_utils.py', 'def prep_text8(raw_bytes, n_test=5_000_000):',
             'def prep_text8(raw_bytes, n_test=4_000_000):', DATA_TESTS),
    Mutation('prep_corpus_holds_out_4m', 'data_utils.py', 'def prep_corpus(dataset, src, out_dir, n_test=5_000_000):',
             'def prep_corpus(dataset, src, out_dir, n_test=4_000_000):', DATA_TESTS),
    Mutation('vocab_ranks_rarest_first', 'data_utils.py', "np.argsort(-counts[n_special:], kind='stable')",
             "np.argsort(counts[n_special:], kind='stable')", DATA_TESTS),
    Mutation('synthetic_switch_prob', 'synthetic_corpus.py', 'switch_prob: float = 1 / 64',
             'switch_prob: float = 1 / 60', DATA_TESTS),
    Mutation('synthetic_concentration', 'synthetic_corpus.py', 'concentration: float = 0.05',
             'concentration: float = 0.055', DATA_TESTS),
    # dynamic top-k schedule (hyper_router.py) and its use in train.py
    Mutation('top_k_off_by_one', 'hyper_router.py', 'frac = step / overall_steps', 'frac = (step + 1) / overall_steps',
             'tests/test_schedules.py'),
    Mutation('top_k_rounds_down', 'hyper_router.py', 'k = k_min + round(span * frac)',
             'k = k_min + int(span * frac)', 'tests/test_schedules.py'),
    Mutation('top_k_rounds_half_up', 'hyper_router.py', 'k = k_min + round(span * frac)',
             'k = k_min + math.floor(span * frac + 0.5)', 'tests/test_schedules.py'),
    Mutation('top_k_decrease_rounds_up', 'hyper_router.py', 'k = k_max - round(span * frac)',
             'k = k_max - math.ceil(span * frac)', 'tests/test_schedules.py'),
    Mutation('top_k_cosine_increase_period', 'hyper_router.py', 'k = k_max - round(span * math.cos(math.pi * frac / 2))',
             'k = k_max - round(span * math.cos(math.pi * frac / 2.2))', 'tests/test_schedules.py'),
    Mutation('top_k_cosine_decrease_period', 'hyper_router.py', 'k = k_min + round(span * math.cos(math.pi * frac / 2))',
             'k = k_min + round(span * math.cos(math.pi * frac / 2.2))', 'tests/test_schedules.py'),
    Mutation('top_k_multi_step_rounds', 'hyper_router.py', 'k = steps[min(int(len(steps) * frac), len(steps) - 1)]',
             'k = steps[min(round(len(steps) * frac), len(steps) - 1)]', 'tests/test_schedules.py'),
    Mutation('train_routes_with_next_k', 'train.py', 'set_top_k(self.model, current_top_k(self.step, self.args))',
             'set_top_k(self.model, current_top_k(self.step + 1, self.args))', 'tests/test_schedules.py'),
    Mutation('k_schedule_over_half_the_run', 'train_args.py', 'args.dynamic_overall_steps = args.max_step',
             'args.dynamic_overall_steps = args.max_step // 2', 'tests/test_schedules.py'),
    # learning rate (optimization.py)
    Mutation('lr_warmup_from_zero', 'optimization.py', 'return args.lr * (step + 1) / args.warmup_step',
             'return args.lr * step / args.warmup_step', 'tests/test_schedules.py'),
    Mutation('lr_cosine_one_step_ahead', 'optimization.py', 'math.cos(math.pi * step / args.max_step)',
             'math.cos(math.pi * (step + 1) / args.max_step)', 'tests/test_schedules.py'),
    Mutation('lr_cosine_to_half', 'optimization.py', '(args.lr - args.eta_min) * 0.5 * (1 + math.cos',
             '(args.lr - args.eta_min) * 0.25 * (2 + math.cos', 'tests/test_schedules.py'),
    Mutation('lr_of_the_next_update', 'train.py', "group['lr'] = learning_rate(self.step, self.args)",
             "group['lr'] = learning_rate(self.step + 1, self.args)", 'tests/test_schedules.py'),
    # methods' objectives
    Mutation('thor_full_alpha', 'train.py', '0.5 * self.args.thor_alpha', 'self.args.thor_alpha',
             'tests/test_objectives.py'),
    Mutation('thor_nll_summed', 'mem_transformer.py', 'out = [0.5 * (nll_1 + nll_2), consistency]',
             'out = [nll_1 + nll_2, consistency]', 'tests/test_objectives.py'),
    Mutation('thor_one_sided_kl', 'mem_transformer.py', 'return 0.5 * ((logp.exp() - logq.exp()) * (logp - logq)).sum(-1)',
             'return (logp.exp() * (logp - logq)).sum(-1)', 'tests/test_objectives.py'),
    Mutation('hyper_router_read_transposed', 'hyper_router.py', 'out = out.view(self.tot_expert, self.d_model + 1)',
             'out = out.view(self.d_model + 1, self.tot_expert).t()', 'tests/test_objectives.py'),
    Mutation('hyper_router_bias_first', 'hyper_router.py', 'return out[:, :-1], out[:, -1]',
             'return out[:, 1:], out[:, 0]', 'tests/test_objectives.py'),
    Mutation('hyper_router_no_relu', 'hyper_router.py', 'nn.ReLU(),', 'nn.Identity(),', 'tests/test_objectives.py'),
    Mutation('hyper_router_hypernet_trains', 'hyper_router.py', 'self.hypernet.requires_grad_(False)',
             'self.hypernet.requires_grad_(True)', 'tests/test_objectives.py'),
    # the scripts' paper settings (and train.py defaults a script relies on)
    Mutation('script_batch_24', 'script/table1/hyper_router_enwik8.sh', '--batch_size 22', '--batch_size 24',
             SCRIPT_SETTINGS),
    Mutation('script_k_from_2', 'script/table1/smoe_dropout_enwik8.sh', '--moe-top-k-min 8', '--moe-top-k-min 2',
             SCRIPT_SETTINGS),
    Mutation('script_k_over_40k_steps', 'script/table1/hyper_router_wiki103.sh', '--dynamic_overall_steps 400000',
             '--dynamic_overall_steps 40000', SCRIPT_SETTINGS),
    Mutation('script_hyper_size_64', 'script/LargeScale/hyper_router_medium_enwik8.sh', '--hyper_size 256',
             '--hyper_size 64', SCRIPT_SETTINGS),
    Mutation('script_large_18_layers', 'script/LargeScale/smoe_dropout_large_enwik8.sh', '--n_layer 12',
             '--n_layer 18', SCRIPT_SETTINGS),
    Mutation('script_large_50k_steps', 'script/LargeScale/hyper_router_large_enwik8.sh', '--max_step 100000',
             '--max_step 50000', SCRIPT_SETTINGS),
    Mutation('script_medium_moe_in_0_to_3', 'script/LargeScale/smoe_medium_enwik8.sh',
             '--moe_index 0,1,2,3,4,5,6,7', '--moe_index 0,1,2,3', SCRIPT_SETTINGS),
    Mutation('script_lr_10x', 'script/table1/thor_enwik8.sh', '--lr 0.00025', '--lr 0.0025', SCRIPT_SETTINGS),
    Mutation('script_eval_tgt_512', 'script/table1/hypermoe_wiki103.sh', '--eval_tgt_len 128', '--eval_tgt_len 512',
             SCRIPT_SETTINGS),
    Mutation('script_mem_256', 'script/table1/directly_dense_enwik8.sh', '--mem_len 512', '--mem_len 256',
             SCRIPT_SETTINGS),
    Mutation('script_dense_not_wide', 'script/table1/directly_dense_dropout_wiki103.sh', '--d_inner 8192',
             '--d_inner 512', SCRIPT_SETTINGS),
    Mutation('script_dense_dropout_0', 'script/table1/directly_dense_dropout_enwik8.sh', '--dropout 0.1',
             '--dropout 0.0', SCRIPT_SETTINGS),
    Mutation('script_smoe_dropout_router_trains', 'script/table1/smoe_dropout_wiki103.sh', '    --freeze_gate \\',
             '    \\', SCRIPT_SETTINGS),
    Mutation('script_seed', 'script/table1/hyper_router_hypermoe_enwik8.sh', '--seed 1111', '--seed 1',
             SCRIPT_SETTINGS),
    Mutation('train_default_clip_1', 'train_args.py', "'--clip', type=float, default=0.25", "'--clip', type=float, default=1.0",
             SCRIPT_SETTINGS),
    # analyses: FLOPs, Table A4, entropy, spectra
    Mutation('flops_memory_512', 'analysis.py', 'qlen=128, mlen=896):', 'qlen=128, mlen=512):', PAPER_ANALYSES),
    Mutation('a4_generated_router_without_bias', 'hyper_router.py',
             "counts['generated_router'] += gate.tot_expert * (gate.d_model + 1)",
             "counts['generated_router'] += gate.tot_expert * gate.d_model", PAPER_ANALYSES),
    Mutation('a4_embedding_counted_as_router', 'hyper_router.py', "if name == 'embedding':",
             "if name == 'embeddings':", PAPER_ANALYSES),
    Mutation('a4_generated_router_shown_trainable', 'analysis.py', "router = 'G'", "router = 'T'", PAPER_ANALYSES),
    Mutation('entropy_mean_over_experts', 'moe.py', 'entropy = -(logp.exp() * logp).sum(-1).double()',
             'entropy = -(logp.exp() * logp).mean(-1).double()', PAPER_ANALYSES),
    Mutation('entropy_sample_std', 'moe.py', 'var = self.entropy_sq_sum / max(self.tokens, 1) - self.mean_entropy ** 2',
             'var = (self.entropy_sq_sum - self.tokens * self.mean_entropy ** 2) / max(self.tokens - 1, 1)',
             PAPER_ANALYSES),
    Mutation('effective_rank_unnormalised', 'analysis.py', 'p = s[s > 0] / s.sum()', 'p = s[s > 0] / s[0]',
             PAPER_ANALYSES),
    Mutation('overlap_of_cosines', 'analysis.py', 'return cos.square().mean().item(),', 'return cos.mean().item(),',
             PAPER_ANALYSES),
    Mutation('angle_of_the_closest_directions', 'analysis.py', 'math.degrees(math.acos(cos[-1].item()))',
             'math.degrees(math.acos(cos[0].item()))', PAPER_ANALYSES),
    # the GPU path (issue 19): fp32 sums under bf16, no host read per step, the engine per GPU, DDP and Adam
    Mutation('expert_bias_gathered_in_bf16', 'moe.py', 'b2 = F.pad(self.h4toh.bias, (0, 0, 0, 1))',
             'b2 = F.pad(self.h4toh.bias.to(dtype), (0, 0, 0, 1))', GPU_BF16),
    Mutation('combine_in_bf16', 'moe.py', 'y_slots = y_slots.to(torch.promote_types(y_slots.dtype, score.dtype))',
             'score = score.to(y_slots.dtype)', GPU_BF16),
    Mutation('hyper_expert_bias_gathered_in_bf16', 'hyper_expert.py', '.add_(b_up.index_select(0, sorted_set))',
             '.add_(b_up.to(dtype).index_select(0, sorted_set))', GPU_BF16),
    Mutation('train_step_reads_the_loss_back', 'train.py', 'total = total + nll.detach().double() / len(chunks)',
             'total = total + nll.item() / len(chunks)', GPU_HOST_READS),
    Mutation('expert_counts_by_bincount', 'moe.py', 'return counts.scatter_add_(0, flat, torch.ones_like(flat))[:num_expert]',
             'return torch.bincount(flat, minlength=num_expert + 1)[:num_expert]', GPU_HOST_READS),
    Mutation('non_finite_steps_never_checked', 'train.py', 'first_bad = int(self.ddp.max(self.first_bad))',
             'first_bad = 0', NON_FINITE),
    Mutation('grouped_engine_on_sm80', 'moe_engine.py', 'if capability < (9, 0):', 'if capability < (8, 0):',
             GPU_ENGINE),
    Mutation('compile_takes_the_loop_on_sm80', 'moe_engine.py', '    if compiling:', '    if False:', GPU_ENGINE),
    Mutation('fastmoe_looked_up_every_forward', 'moe.py', '@functools.lru_cache(maxsize=None)', '', GPU_ENGINE),
    Mutation('sdpa_backend_left_to_the_dispatcher', 'mem_transformer.py', 'with sdpa_backends(bias.requires_grad):',
             'with sdpa_backends(False):', 'tests/test_gpu_path.py -k pinned'),
    Mutation('ddp_all_reduces_every_chunk', 'train.py', 'if self.ddp_model is None or last_chunk:', 'if True:',
             'tests/test_gpu_path.py -k all_reduces_once'),
    Mutation('adam_not_fused_on_cuda', 'optimization.py', 'torch.optim.Adam(params, lr=args.lr, fused=True)',
             'torch.optim.Adam(params, lr=args.lr)', 'tests/test_gpu_path.py -k fused'),
    Mutation('fused_adam_leaves_the_version_counters', 'optimization.py',
             'optimizer.register_step_post_hook(mark_params_updated)', '', 'tests/test_gpu_path.py -k fused'),
    # the plain softmax's loss in chunks of rows (adaptive_softmax.py)
    Mutation('chunked_loss_targets_off_by_one', 'adaptive_softmax.py', 'target.tensor_split(n_chunks)',
             'target.roll(1).tensor_split(n_chunks)', 'tests/test_chunked_softmax.py'),
    Mutation('chunked_loss_backward_keeps_the_logits', 'adaptive_softmax.py', 'if grad else self._plain_nll(h, t)',
             'if False else self._plain_nll(h, t)', 'tests/test_chunked_softmax.py -k peaks'),
    # the simulated-device tier: a tensor made on the CPU in the forward, a host read in every MoE forward
    Mutation('sim_group_ends_made_on_the_cpu', 'moe_engine.py',
             'groups = torch.arange(n_group, device=sorted_group.device, dtype=sorted_group.dtype)',
             'groups = torch.arange(n_group, dtype=sorted_group.dtype)', 'tests/test_sim_device.py -k smoe-plain'),
    Mutation('sim_host_read_per_moe_forward', 'moe.py', '    if k == num_expert:',
             '    if k == num_expert or bool(top_idx.min() < -1):', 'tests/test_sim_device.py -k smoe-plain'),
    # TensorBoard: the HParams row, the --valid_ks curves, the charts (tests/test_tensorboard.py)
    Mutation('hparams_test_of_the_wrong_checkpoint', 'evaluation.py', 'kind = table_checkpoint(config)',
             "kind = 'best'", 'tests/test_tensorboard.py -k "hparams_row or dynamic_k_run"'),
    Mutation('hparams_dense_value_in_the_first_column', 'evaluation.py', "max(ks) if k == 'dense'",
             "min(ks) if k == 'dense'", 'tests/test_tensorboard.py -k dense_runs_one_value'),
    Mutation('valid_ks_logs_the_training_k', 'train.py', 'self._valid_loss(k)', 'self._valid_loss(self.args.moe_top_k)',
             'tests/test_tensorboard.py -k "valid_ks_curves"'),
    Mutation('valid_ks_leaves_its_last_k', 'train.py', 'set_top_k(self.model, self.args.moe_top_k)', 'pass',
             'tests/test_tensorboard.py -k "valid_ks_leaves_a_thor_run"'),
    Mutation('dropped_charts_for_dropless_runs', 'run_utils.py', 'if capacity:', 'if True:',
             'tests/test_tensorboard.py -k dropped_fraction_charts'),
    Mutation('eval_run_keeps_the_hparams_row', 'eval.py', "return 'test'", "return 'eval_test'",
             'tests/test_tensorboard.py -k eval_run_adds'),
    # output paths (output_files.py, eval.py --json -)
    Mutation('fifo_replaced_by_a_rename', 'output_files.py', 'elif is_special(path):', 'elif False:',
             'tests/test_output_files.py'),
    Mutation('dash_is_a_file_name', 'output_files.py', 'sys.stdout.write(text)', "open(path, 'w').write(text)",
             'tests/test_output_files.py'),
    Mutation('symlink_replaced_by_the_file', 'output_files.py', 'target = os.path.realpath(path)', 'target = path',
             'tests/test_output_files.py'),
    Mutation('load_cell_std_of_one_run', 'analysis.py', "('' if std is None else f' ± {std:.{digits}f}')",
             "f' ± {std:.{digits}f}'", 'tests/test_seeds.py -k load'),
    Mutation('json_dash_mixed_with_the_tables', 'eval.py', 'if args.json == STDOUT else', 'if False else',
             'tests/test_output_files.py'),
]


def read_more_mutations(path):
    """Mutations from a text file, one a line: name | file | original | mutated | selector ('#' starts a comment)."""
    if not os.path.isfile(path):
        return []
    mutations = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip() or line.lstrip().startswith('#'):
                continue
            fields = [field.strip() for field in line.rstrip('\n').split(' | ')]
            if len(fields) != 5:
                sys.exit(f'error: {path}:{number}: expected 5 fields separated by " | ", got {len(fields)}')
            mutations.append(Mutation(*fields))
    return mutations


def copy_repository(target):
    """The files git knows (committed, or untracked and not ignored) under `target`."""
    listed = subprocess.run(['git', 'ls-files', '--cached', '--others', '--exclude-standard', '-z'], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.split('\0')
    for path in filter(None, listed):
        source = os.path.join(REPO, path)
        if os.path.isfile(source):
            os.makedirs(os.path.dirname(os.path.join(target, path)), exist_ok=True)
            shutil.copy2(source, os.path.join(target, path))


def run_tests(copy, selector, timeout):
    """(passed, seconds, output tail) of `python -m pytest -q -x SELECTOR` in the copy."""
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONDONTWRITEBYTECODE='1')   # no stale bytecode between runs
    start = time.time()
    try:
        result = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-x', *shlex.split(selector)], cwd=copy,
                                env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, time.time() - start, f'timed out after {timeout} s'
    return result.returncode == 0, time.time() - start, (result.stdout + result.stderr)[-1500:]


def read_checked(root, mutation):
    """The text of the mutation's file under root; exits unless the original occurs exactly once on one line."""
    path = os.path.join(root, mutation.file)
    if not os.path.isfile(path):
        sys.exit(f'error: mutation {mutation.name}: no file {mutation.file}')
    with open(path) as f:
        text = f.read()
    count = text.count(mutation.original)
    if count != 1 or '\n' in mutation.original:
        sys.exit(f'error: mutation {mutation.name}: {mutation.original!r} occurs {count} times in {mutation.file}; '
                 'it must be a piece of one line that occurs exactly once')
    return text


def mutate(copy, mutation):
    """Apply the mutation in the copy; returns the file's original text, to restore."""
    text = read_checked(copy, mutation)
    with open(os.path.join(copy, mutation.file), 'w') as f:
        f.write(text.replace(mutation.original, mutation.mutated))
    return text


def check(mutations, timeout):
    """{name: (caught, seconds)}; exits when the unchanged copy fails a selector."""
    results = {}
    with tempfile.TemporaryDirectory(prefix='mutation-check-') as copy:
        copy_repository(copy)
        for selector in dict.fromkeys(m.selector for m in mutations):
            passed, seconds, tail = run_tests(copy, selector, timeout)
            print(f'unchanged: {selector}: {"passes" if passed else "FAILS"} ({seconds:.0f} s)', flush=True)
            if not passed:
                sys.exit(f'error: the unchanged repository fails `pytest {selector}`, so no mutation can be judged '
                         f'by it; fix that first:\n{tail}')
        for mutation in mutations:
            original = mutate(copy, mutation)
            try:
                passed, seconds, _ = run_tests(copy, mutation.selector, timeout)
            finally:
                with open(os.path.join(copy, mutation.file), 'w') as f:
                    f.write(original)
            results[mutation.name] = (not passed, seconds)
            print(f'{mutation.name:<40} {"caught" if not passed else "MISSED"} ({seconds:.0f} s)', flush=True)
    return results


def format_table(mutations, results):
    lines = [f"{'mutation':<40} {'file':<50} {'result':<7} tests"]
    for m in mutations:
        caught, _ = results[m.name]
        lines.append(f"{m.name:<40} {m.file:<50} {'caught' if caught else 'MISSED':<7} {m.selector}")
    n_caught = sum(caught for caught, _ in results.values())
    lines.append(f'{n_caught} of {len(results)} mutations caught')
    return '\n'.join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--list', action='store_true', help='list the mutations and exit')
    parser.add_argument('--only', help='comma-separated names of the mutations to check')
    parser.add_argument('--timeout', type=int, default=900, help='seconds allowed to one pytest run')
    args = parser.parse_args(argv)
    mutations = MUTATIONS + read_more_mutations(os.path.join(REPO, MORE_MUTATIONS))
    names = [m.name for m in mutations]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        sys.exit(f'error: mutation names used twice: {", ".join(duplicates)}; rename one of each')
    if args.only:
        wanted = [name.strip() for name in args.only.split(',') if name.strip()]
        unknown = [name for name in wanted if name not in names]
        if unknown:
            parser.error(f'unknown mutation {", ".join(unknown)}; see --list')
        mutations = [m for m in mutations if m.name in wanted]
    for m in mutations:
        read_checked(REPO, m)
    if args.list:
        for m in mutations:
            print(f'{m.name:<40} {m.file:<50} {m.selector}\n    - {m.original}\n    + {m.mutated}')
        return 0
    results = check(mutations, args.timeout)
    print(format_table(mutations, results))
    return 0 if all(caught for caught, _ in results.values()) else 1


if __name__ == '__main__':
    sys.exit(main())
