"""``unidg serve``, ``unidg bench serve`` and ``unidg capi build`` (registered by unidg.cli)."""

from __future__ import annotations

import argparse
import json

from unidg.core.errors import OptionError
from unidg.runtime.cli_options import (
    add_backend_options,
    add_bundle_option,
    add_command,
    add_json_option,
    add_out_option,
    backend_options,
    command_group,
    option_values,
    write_json_option,
)
from unidg.runtime.commands import bench_subparsers


def register(subparsers: argparse._SubParsersAction) -> None:
    serve = add_command(
        subparsers,
        run_serve,
        "serve",
        help="HTTP service: POST /v1/synthesize, /healthz, /readyz, /metrics (docs/service.md)",
        description="Serve a bundle over HTTP. Binds to loopback unless an API key is given (--api-key-env).",
    )
    add_bundle_option(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind")
    serve.add_argument("--port", type=int, default=8080, help="TCP port to listen on")
    serve.add_argument("--workers", type=int, default=1, help="synthesis threads, each with its own model")
    serve.add_argument("--max-queue", type=int, default=8, help="requests waiting for a worker before 503")
    serve.add_argument("--timeout", type=float, default=120.0, help="seconds per request, queue included")
    serve.add_argument("--max-upload-mb", type=float, default=20.0, help="request body limit in MiB")
    serve.add_argument(
        "--api-key-env",
        metavar="VAR",
        help="environment variable holding the API key; clients send it as X-API-Key (needed off loopback)",
    )
    serve.add_argument("--max-steps", type=int, default=200, help="largest steps a request may ask for")
    add_backend_options(serve)  # onnxruntime on the CPU: cores / workers threads per worker unless --threads
    serve.add_argument("--no-warmup", action="store_true", help="skip the one-step warm-up run before /readyz is 200")
    levels = ("critical", "error", "warning", "info", "debug")
    serve.add_argument("--log-level", default="info", choices=levels, help="uvicorn log level")

    bench = add_command(
        bench_subparsers(subparsers),
        run_serve_bench,
        "serve",
        help="load-test the HTTP service on loopback: latency p50/p95 and server memory",
        description="Start `unidg serve` on a free loopback port (or use --url), send --requests synthesize requests "
        "at --concurrency, and report latency percentiles and the server's RSS before and after.",
    )
    bench.add_argument("--bundle", help="bundle folder (starts a server); or give --url")
    bench.add_argument("--url", help="an already running service, e.g. http://127.0.0.1:8080")
    bench.add_argument("--requests", type=int, default=200, help="valid requests sent in total")
    bench.add_argument("--concurrency", type=int, default=8, help="clients sending at once")
    bench.add_argument("--workers", type=int, default=2, help="server synthesis threads")
    bench.add_argument("--max-queue", type=int, default=16, help="the service's --max-queue")
    bench.add_argument("--steps", type=int, default=4, help="denoising steps per request")
    bench.add_argument("--size", type=int, default=96, help="source/reference image side in pixels")
    bench.add_argument("--threads", type=int, default=1, help="onnxruntime threads per server worker")
    bench.add_argument(
        "--scenario",
        choices=("valid", "oversized", "overload", "idle", "refused", "slow-body"),
        default="valid",
        help="valid requests; simultaneous uploads declaring huge images; a full queue; idle connections; huge "
        "requests decoded then refused (peak RSS vs the documented bound); slow bodies while valid requests are sent",
    )
    bench.add_argument("--declared-size", type=int, default=4096, help="oversized: side of each declared image")
    bench.add_argument("--idle-connections", type=int, default=300, help="idle: sockets held open")
    bench.add_argument("--hold", type=float, default=10.0, help="idle: seconds they are held")
    bench.add_argument("--slow-bodies", type=int, default=9, help="slow-body: connections trickling their bodies")
    bench.add_argument("--slow-interval", type=float, default=10.0, help="slow-body: seconds between 100-byte pieces")
    bench.add_argument("--server-pythonpath", help="PYTHONPATH of the started server only (measure another checkout)")
    bench.add_argument("--server-nofile", type=int, help="file-descriptor limit of the started server (ulimit -n)")
    add_json_option(bench, "also write the report as JSON to this file", dest="json_out")

    capi_commands = command_group(
        subparsers, "capi", "C ABI: build libunidg.so + unidg.h (docs/capi.md)", metavar="COMMAND"
    )
    build = add_command(
        capi_commands,
        run_capi_build,
        "build",
        help="compile libunidg.so (cffi embedding mode) and copy unidg.h into --out",
        description="Compile libunidg.so, which embeds this environment's Python and finds unidg in its site-packages.",
    )
    add_out_option(build, "output folder for libunidg.so and unidg.h")
    build.add_argument("--verbose", action="store_true", help="show the compiler commands")


def run_serve(args: argparse.Namespace) -> int:
    # The service, the load test and the C API builder load when their command runs: `unidg --help` stays light.
    from unidg.runtime.serve import ServeConfig, api_key_from_env, serve

    config = ServeConfig(
        **option_values(args, "bundle", "host", "port", "workers", "max_queue"),
        timeout_s=args.timeout,
        max_upload_mb=args.max_upload_mb,
        max_steps=args.max_steps,
        api_key=api_key_from_env(args.api_key_env),
        backend=args.backend,
        backend_options=backend_options(args, workers=args.workers),
        warmup=not args.no_warmup,
        verify=not args.no_verify,
    )
    # Fail before binding when the bundle cannot be read or lacks the cache asked for (the workers re-check it with
    # sha256 while loading).
    from unidg.runtime.bundle import load_bundle
    from unidg.runtime.step_cache import bundle_step_cache

    bundle_step_cache(load_bundle(args.bundle, verify=False), args.cache, args.cache_threshold)
    serve(config, log_level=args.log_level)
    return 0


def run_serve_bench(args: argparse.Namespace) -> int:
    from unidg.runtime.serve_bench import BenchOptions, run_bench_command

    if not args.bundle and not args.url:
        raise OptionError("give --bundle (to start a server) or --url (to use a running one)")
    report = run_bench_command(
        BenchOptions(
            **option_values(args, "bundle", "url", "requests", "concurrency", "workers", "max_queue", "steps", "size"),
            **option_values(args, "threads", "scenario", "declared_size", "idle_connections", "slow_bodies"),
            **option_values(args, "server_pythonpath", "server_nofile"),
            hold_s=args.hold,
            slow_interval_s=args.slow_interval,
        )
    )
    print(report.summary())
    write_json_option(args.json_out, json.dumps(report.to_dict(), indent=2), say=False)
    if args.scenario in ("oversized", "overload"):  # refusals are the point there; a dead server is not
        return 0 if report.server_alive is not False else 1
    if args.scenario == "refused":  # the measured peak must stay within the documented bound
        within = report.memory_bound_mib is None or (report.rss_peak_mib or 0.0) <= report.memory_bound_mib
        return 0 if report.server_alive is not False and within else 1
    return 0 if report.failed == 0 else 1


def run_capi_build(args: argparse.Namespace) -> int:
    from unidg.runtime.capi.build import build_library

    built = build_library(args.out, verbose=args.verbose)
    print(f"built {built.library}")
    print(f"header {built.header}")
    print(f"embeds {built.libpython}, started as {built.python} (override with UNIDG_PYTHON; PYTHONPATH is honoured)")
    return 0
