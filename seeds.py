"""Runs repeated over seeds: which runs are one configuration, their mean and spread, and the paired test.

At the demo's scale two methods often differ by less than a change of seed does, so every table and figure
built from several runs first groups the runs that differ only in their seed (`group_runs`), then reports
mean ± sample standard deviation over the group. `paired_t_test` compares two groups seed by seed.

Pure functions on what train.py writes (config.json, results.json entries); the statistics use only `math`
(the Student t distribution through the regularised incomplete beta function, no scipy).
"""
import json
import math
import os

# fields of config.json that say how or where a run was made, not what was trained; two runs that differ
# only in these (and the seed) are repetitions of one configuration
RUN_ARGS = ('seed', 'work_dir', 'restart', 'restart_dir', 'stop_step')
RUN_FIELDS = ('git_commit', 'git_modified', 'start_step')


def read_config(run_dir):
    path = os.path.join(run_dir, 'config.json')
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{path} not found: give run directories written by train.py')
    with open(path) as f:
        return json.load(f)


def run_seed(config):
    return config['args']['seed']


def configuration(config):
    """config.json without the seed and the fields of the run itself (directory, commit, resume point)."""
    kept = {key: value for key, value in config.items() if key not in RUN_FIELDS}
    kept['args'] = {key: value for key, value in config['args'].items() if key not in RUN_ARGS}
    return kept


def flat_settings(config):
    """{name: value} of every setting of a configuration (args, model_config, other fields), for labels."""
    flat = {}
    for key, value in configuration(config).items():
        flat.update(value if isinstance(value, dict) else {key: value})
    return flat


def group_runs(configs, names):
    """[(label, [index, ...])]: the runs grouped by configuration (everything but the seed), in the order of
    their first run. names: each run's method name; a name shared by several configurations gets the settings
    that tell them apart, e.g. 'SMoE (lr=0.001)'."""
    keys = [json.dumps(configuration(c), sort_keys=True) for c in configs]
    groups = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    members = list(groups.values())
    return [(label, indices) for label, indices in zip(group_labels(members, configs, names), members)]


def group_labels(members, configs, names):
    labels = []
    for indices in members:
        name = names[indices[0]]
        twins = [m for m in members if names[m[0]] == name]
        if len(twins) == 1:
            labels.append(name)
            continue
        settings = [flat_settings(configs[m[0]]) for m in twins]
        mine = flat_settings(configs[indices[0]])
        differing = [k for k in mine if any(s.get(k) != mine[k] for s in settings)]
        shown = ', '.join(f'{k}={mine[k]}' for k in differing[:3]) + (', ...' if len(differing) > 3 else '')
        labels.append(f'{name} ({shown})')
    return labels


def mean_std(values):
    """(mean, sample standard deviation with n - 1); the deviation is None for a single value."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def summarise(results_list):
    """{k: {'mean', 'std', 'n', 'values'}} over the results ({k: metric}) of the runs of one configuration."""
    ks = sorted({k for results in results_list for k in results}, key=lambda k: (k == 'dense', k.isdigit() and int(k)))
    summary = {}
    for k in ks:
        values = [results[k] for results in results_list if k in results]
        mean, std = mean_std(values)
        summary[k] = {'mean': mean, 'std': std, 'n': len(values), 'values': values}
    return summary


def format_cell(stats, n_runs):
    """'1.080' for one run, '1.080 ± 0.004' for several; '(n=2)' added when this k lacks some runs."""
    if stats['std'] is None and n_runs == 1:
        return stats['mean']
    text = f"{stats['mean']:.3f}" + ('' if stats['std'] is None else f" ± {stats['std']:.3f}")
    return text + (f" (n={stats['n']})" if stats['n'] != n_runs else '')


# ----------------------------------------------------------------------------- Student t, paired t-test

def _beta_continued_fraction(a, b, x, max_terms=500, eps=1e-15):
    """The continued fraction of I_x(a, b) (DLMF 8.17.22), evaluated by the modified Lentz method."""
    tiny = 1e-300

    def guard(value):
        return value if abs(value) > tiny else tiny

    c, d = 1.0, 1.0 / guard(1.0 - (a + b) * x / (a + 1.0))
    fraction = d
    for m in range(1, max_terms + 1):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),                # d_2m
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):    # d_2m+1
            d = 1.0 / guard(1.0 + numerator * d)
            c = guard(1.0 + numerator / c)
            fraction *= c * d
        if abs(c * d - 1.0) < eps:
            return fraction
    raise ArithmeticError(f'incomplete beta: no convergence for a={a}, b={b}, x={x}')


def incomplete_beta(a, b, x):
    """The regularised incomplete beta function I_x(a, b), for a, b > 0 and 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):          # the fraction converges fast here; else use I_x(a,b) = 1 - I_1-x(b,a)
        return front * _beta_continued_fraction(a, b, x) / a
    return 1.0 - front * _beta_continued_fraction(b, a, 1.0 - x) / b


def t_two_sided_p(t, df):
    """P(|T| >= |t|) for Student's t with df degrees of freedom: I_{df / (df + t^2)}(df / 2, 1 / 2)."""
    if math.isinf(t):
        return 0.0
    return incomplete_beta(df / 2.0, 0.5, df / (df + t * t))


def paired_t_test(a, b):
    """Two-sided paired t-test of the pairs (a_i, b_i): {'n', 'mean' (of a - b), 'std' (sample), 't', 'df', 'p'}.
    Identical differences have no spread: t is +-inf (p 0) unless they are all zero (t 0, p 1)."""
    diffs = [x - y for x, y in zip(a, b)]
    n = len(diffs)
    if n < 2:
        raise ValueError(f'a paired t-test needs at least 2 pairs, got {n}')
    mean, std = mean_std(diffs)
    if std == 0:
        t = 0.0 if mean == 0 else math.copysign(math.inf, mean)
    else:
        t = mean / (std / math.sqrt(n))
    return {'n': n, 'mean': mean, 'std': std, 't': t, 'df': n - 1, 'p': t_two_sided_p(t, n - 1)}


def compare_by_seed(results_a, results_b, alpha=0.05):
    """Rows per k common to both sides: the paired t-test of A - B over the seeds present in both.
    results_a, results_b: {seed: {k: metric}}."""
    seeds = sorted(set(results_a) & set(results_b))
    if len(seeds) < 2:
        raise ValueError(f'--compare needs at least 2 seeds present on both sides; A has seeds '
                         f'{sorted(results_a)}, B has {sorted(results_b)}. Train the missing ones with '
                         f'SEEDS="..." bash script/...')
    common_ks = set.intersection(*(set(results_a[s]) & set(results_b[s]) for s in seeds))
    rows = []
    for k in sorted(common_ks, key=lambda k: (k == 'dense', k.isdigit() and int(k))):
        a = [results_a[s][k] for s in seeds]
        b = [results_b[s][k] for s in seeds]
        test = paired_t_test(a, b)
        rows.append(dict(test, k=k, mean_a=mean_std(a)[0], std_a=mean_std(a)[1], mean_b=mean_std(b)[0],
                         std_b=mean_std(b)[1], beyond_spread=test['p'] < alpha))
    return seeds, rows


def format_comparison(label_a, label_b, metric, seeds, rows, alpha=0.05):
    lines = [f'A = {label_a}, B = {label_b}: {metric}, {len(seeds)} matched seeds ({", ".join(map(str, seeds))})',
             f'two-sided paired t-test of A - B over the seeds (df = {len(seeds) - 1}); "beyond spread": p < {alpha}',
             f"{'k':>5}{'mean A':>9}{'std A':>8}{'mean B':>9}{'std B':>8}{'mean A-B':>10}{'std A-B':>9}"
             f"{'t':>9}{'p':>8}  beyond spread"]
    for r in rows:
        lines.append(f"{r['k']:>5}{r['mean_a']:>9.3f}{r['std_a']:>8.3f}{r['mean_b']:>9.3f}{r['std_b']:>8.3f}"
                     f"{r['mean']:>+10.4f}{r['std']:>9.4f}{r['t']:>9.2f}{r['p']:>8.3f}  "
                     f"{'yes' if r['beyond_spread'] else 'no'}")
    return '\n'.join(lines)
