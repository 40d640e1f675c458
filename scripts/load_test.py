#!/usr/bin/env python3
"""The lsm_ros load test as a plain script (no installation needed): lsm_node with the tiny random LSM under a
30 Hz stereo stream, inference slowed by a fixed delay, ~/query and ~/render asked about once per second; prints
the figures (RSS growth and slope, latency, drops, answers) and exits 1 when a bound of the scenario is broken.
The scenario is lsm_ros/ros/load_test.py, the one test/test_load.py runs; DDS stays on loopback by itself.

    .venv/bin/python scripts/load_test.py                       # the test's scenario: 180 s
    .venv/bin/python scripts/load_test.py --minutes 30 --json load.json
    .venv/bin/python scripts/load_test.py --duration 60 --stock-executor   # rclpy's MultiThreadedExecutor, to compare
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
TEST_RESOLUTION = 224   # the model size of the test's tiny LSM (test/conftest.py)


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    from lsm_ros.cli import positive_float
    from lsm_ros.ros.load_test import LoadTestConfig
    defaults = LoadTestConfig()
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    length = parser.add_mutually_exclusive_group()
    length.add_argument('--duration', type=positive_float, help=f'stream seconds (default {defaults.duration_s:g})')
    length.add_argument('--minutes', type=positive_float, help='stream minutes')
    parser.add_argument('--rate', type=positive_float, default=defaults.rate_hz,
                        help='stereo pairs per second (default %(default)s)')
    parser.add_argument('--delay', type=float, default=defaults.inference_delay_s,
                        help='seconds added to every reconstruction (default %(default)s)')
    parser.add_argument('--request-period', type=positive_float, default=defaults.request_period_s,
                        help='seconds between ~/query + ~/render requests (default %(default)s)')
    parser.add_argument('--max-rss-growth-mb', type=positive_float, default=defaults.max_rss_growth_mb,
                        help='bound on the RSS growth after the warm-up, MB (default %(default)s)')
    parser.add_argument('--max-latency', type=positive_float, default=defaults.max_latency_s,
                        help='bound on publish -> ~/info, seconds (default %(default)s)')
    parser.add_argument('--threads', type=int, default=defaults.torch_threads,
                        help='torch threads (default %(default)s)')
    parser.add_argument('--stock-executor', action='store_true',
                        help="spin with rclpy's MultiThreadedExecutor instead of lsm_ros.ros.graph's steady one")
    parser.add_argument('--json', type=Path, help='write the figures, configuration and series here')
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(name)s: %(message)s',
                        datefmt='%H:%M:%S')
    args = parse_arguments(argv)
    from lsm_ros.benchmark import build_bench_reconstructor
    from lsm_ros.ros.load_test import LoadTestConfig, format_figures, run_load_test
    overrides = dict(rate_hz=args.rate, inference_delay_s=args.delay, request_period_s=args.request_period,
                     max_rss_growth_mb=args.max_rss_growth_mb, max_latency_s=args.max_latency,
                     torch_threads=args.threads, steady_executor=not args.stock_executor)
    if args.duration or args.minutes:
        overrides['duration_s'] = args.duration or 60.0 * args.minutes
    config = LoadTestConfig.from_environment(**overrides)
    reconstructor = build_bench_reconstructor(quick=True, device='cpu', precision='fp32')
    reconstructor.config = dataclasses.replace(reconstructor.config, resolution=TEST_RESOLUTION)
    result = run_load_test(reconstructor, config)
    failures = result.failures()
    print(format_figures(result.figures()))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(result.to_dict(), failures=failures), indent=1, default=str))
        print(f'wrote {args.json}')
    print('PASSED' if not failures else 'FAILED:\n  ' + '\n  '.join(failures))
    return 0 if not failures else 1


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
