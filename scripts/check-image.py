#!/usr/bin/env python3
"""Checks deploy/Dockerfile without a Docker engine: the image's build stage builds, and its runtime
stage's contract holds.

Build stage: the build context is laid out exactly as Docker would send it — the repository minus
what .dockerignore excludes — and the build stage's own COPY lines copy from it into a directory that
stands for its WORKDIR. The cargo command of its RUN line then runs there as written (`--locked`
required), offline after `cargo fetch --locked` primed the registry. The stage's cache mount of the
target directory is the repository's own target directory (warm dependencies, as a reused cache
mount would be); by default `--release` is dropped (a debug build of the same command: CI time, see
the README), `--release` here keeps it.

Runtime stage: the binary just built runs the way the image runs it, in a private mount namespace
(`unshare`, as root): every mount read-only (readOnlyRootFilesystem), the image's VOLUME a writable
directory laid out as its RUN line does and owned by its USER, the binary at the image's path, the
process as the image's USER with no capabilities and no new privileges, the image's ENV (listen
addresses moved to free loopback ports). The HEALTHCHECK command must pass, a webhook batch must be
made durable on the volume, SIGTERM must stop the daemon with status 0, and `--version` must name the
commit passed as the build argument.

Usage: scripts/check-image.py [--release] [--build-only]. STRICT=1: a runtime check that cannot run
(not root, no unshare/setpriv) is an error instead of a skip.
"""

import fnmatch
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.realpath(os.path.join(os.path.dirname(__file__), ".."))
DOCKERFILE = os.path.join(ROOT, "deploy", "Dockerfile")
STRICT = os.environ.get("STRICT", "0") == "1"


def fail(msg):
    print(f"check-image: {msg}", file=sys.stderr)
    sys.exit(1)


# ---------------------------------------------------------------------------------------------
# Dockerfile
# ---------------------------------------------------------------------------------------------


def instructions(path):
    """(INSTRUCTION, arguments) in order: comments dropped, continuation lines joined."""
    out, current = [], ""
    for raw in open(path, encoding="utf-8"):
        line = raw.rstrip("\n")
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if current and line.lstrip().startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        word, _, rest = current.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        current = ""
    if current:
        fail("Dockerfile ends inside a continued line")
    return out


def stages(instrs):
    """The stages, each a list of instructions starting with its FROM."""
    result = []
    for ins in instrs:
        if ins[0] == "FROM":
            result.append([])
        elif not result:
            if ins[0] == "ARG":
                continue  # global ARG before the first FROM
            fail(f"{ins[0]} before the first FROM")
        result[-1].append(ins)
    return result


def flags_and_args(rest):
    """`--flag=value` options, then the other words (shell-split)."""
    words = shlex.split(rest)
    flags = {}
    while words and words[0].startswith("--"):
        k, _, v = words.pop(0)[2:].partition("=")
        flags.setdefault(k, []).append(v)
    return flags, words


def arg_defaults(stage):
    out = {}
    for word, rest in stage:
        if word == "ARG":
            name, _, default = rest.partition("=")
            out[name.strip()] = default.strip().strip('"')
    return out


def env_of(stage):
    """ENV key=value pairs of a stage, in order."""
    env = {}
    for word, rest in stage:
        if word == "ENV":
            for item in shlex.split(rest):
                k, sep, v = item.partition("=")
                if not sep:
                    fail(f"ENV {rest}: only the key=value form is read")
                env[k] = v
    return env


def json_or_shell(rest):
    rest = rest.strip()
    return json.loads(rest) if rest.startswith("[") else ["/bin/sh", "-c", rest]


# ---------------------------------------------------------------------------------------------
# .dockerignore and the build context
# ---------------------------------------------------------------------------------------------


def ignore_patterns():
    """(pattern, excluded) in order, cleaned the way Docker cleans them."""
    path = os.path.join(ROOT, ".dockerignore")
    out = []
    if not os.path.exists(path):
        return out
    for raw in open(path, encoding="utf-8"):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        excluded = not line.startswith("!")
        if not excluded:
            line = line[1:].strip()
        line = os.path.normpath(line).lstrip("/")
        if line in ("", "."):
            continue
        out.append((line, excluded))
    return out


def pattern_regex(pattern):
    """Docker's matching (Go filepath.Match per segment, `**` for any number of directories)."""
    out, i = "^", 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            i += 2
            if pattern.startswith("/", i):
                i += 1
                out += "(.*/)?"
            else:
                out += ".*"
            continue
        if c == "*":
            out += "[^/]*"
        elif c == "?":
            out += "[^/]"
        elif c == "[":
            j = pattern.find("]", i)
            if j < 0:
                fail(f".dockerignore: unclosed [ in {pattern}")
            cls = pattern[i + 1 : j]
            out += "[" + ("^" + cls[1:] if cls.startswith("^") else cls) + "]"
            i = j
        elif c == "\\" and i + 1 < len(pattern):
            i += 1
            out += re.escape(pattern[i])
        else:
            out += re.escape(c)
        i += 1
    return re.compile(out + "$")


def excluded_by(patterns, rel):
    """Whether a context path is left out: the last pattern matching it or one of its parents wins."""
    parts = rel.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    result = False
    for regex, excluded in patterns:
        if any(regex.match(p) for p in prefixes):
            result = excluded
    return result


def context_files():
    """Every file and symlink Docker would send, relative to the repository root."""
    patterns = [(pattern_regex(p), ex) for p, ex in ignore_patterns()]
    has_exceptions = any(not ex for _, ex in patterns)
    files = []
    for dirpath, dirnames, filenames in os.walk(ROOT):
        rel_dir = os.path.relpath(dirpath, ROOT)
        rel_dir = "" if rel_dir == "." else rel_dir + "/"
        if not has_exceptions:  # nothing below an excluded directory can come back
            dirnames[:] = [d for d in dirnames if not excluded_by(patterns, rel_dir + d)]
        dirnames.sort()
        for f in sorted(filenames):
            if not excluded_by(patterns, rel_dir + f):
                files.append(rel_dir + f)
    return files


def lay_out(build_stage, dest_root):
    """Copies what the build stage's COPY lines take from the context into dest_root, which stands
    for the filesystem root of the stage; returns the WORKDIR (absolute, inside the stage)."""
    files = context_files()
    file_set = set(files)
    workdir = "/"
    for word, rest in build_stage:
        if word == "WORKDIR":
            workdir = os.path.normpath(os.path.join(workdir, rest))
        elif word in ("COPY", "ADD"):
            flags, args = flags_and_args(rest)
            if "from" in flags:
                continue
            if word == "ADD" or len(args) < 2:
                fail(f"{word} {rest}: only COPY <src>... <dest> from the context is read")
            *sources, dest = args
            dest_abs = os.path.normpath(os.path.join(workdir, dest))
            as_dir = dest.endswith("/") or len(sources) > 1 or dest in (".", "./")
            for src in sources:
                src = os.path.normpath(src).lstrip("/")
                matched = [f for f in files if fnmatch.fnmatchcase(f, src)] if any(c in src for c in "*?[") else []
                if src in file_set:
                    targets = [(src, os.path.join(dest_abs, os.path.basename(src)) if as_dir else dest_abs)]
                elif matched:
                    targets = [(f, os.path.join(dest_abs, os.path.basename(f))) for f in matched]
                else:
                    below = [f for f in files if f.startswith(src + "/")]
                    if not below:
                        fail(f"COPY {src}: not in the build context (missing, or excluded by .dockerignore)")
                    targets = [(f, os.path.join(dest_abs, f[len(src) + 1 :])) for f in below]
                for f, target in targets:
                    out = os.path.join(dest_root, target.lstrip("/"))
                    os.makedirs(os.path.dirname(out), exist_ok=True)
                    shutil.copy2(os.path.join(ROOT, f), out, follow_symlinks=False)
    return workdir


def cargo_command(build_stage):
    """The `cargo build` part of the build stage's RUN line, and the stage's cache mounts."""
    for word, rest in build_stage:
        if word != "RUN" or "cargo build" not in rest:
            continue
        flags, _ = flags_and_args(rest.split(" cargo ")[0])
        mounts = []
        for m in flags.get("mount", []):
            kv = dict(p.partition("=")[::2] for p in m.split(","))
            if kv.get("type") == "cache":
                mounts.append(kv["target"])
        shell = re.sub(r"^(--\S+\s+)+", "", rest)
        steps = [s.strip() for s in shell.split("&&")]
        cargo = [s for s in steps if re.search(r"(^|\s)cargo build(\s|$)", s)]
        if len(cargo) != 1:
            fail(f"RUN {rest}: expected one `cargo build` step")
        if "--locked" not in shlex.split(cargo[0]):
            fail(f"the image's cargo build runs without --locked: {cargo[0]}")
        return cargo[0], mounts
    fail("the build stage has no RUN with `cargo build`")


def build(release, commit):
    instrs = instructions(DOCKERFILE)
    build_stage, runtime = stages(instrs)[0], stages(instrs)[-1]
    version = re.search(r'^version = "([^"]+)"', open(os.path.join(ROOT, "Cargo.toml")).read(), re.M).group(1)
    if arg_defaults(runtime).get("VERSION") != version:
        fail(f"the runtime stage's ARG VERSION default is not Cargo.toml's version {version}")

    stage_root = os.path.join(ROOT, "target", "image-check", "stage")
    shutil.rmtree(stage_root, ignore_errors=True)
    workdir = lay_out(build_stage, stage_root)
    src = os.path.join(stage_root, workdir.lstrip("/"))
    n = sum(len(fs) for _, _, fs in os.walk(src))
    print(f"build context laid out from the COPY lines: {n} files in {workdir}")

    command, mounts = cargo_command(build_stage)
    target_mount = os.path.join(workdir, "target")
    if target_mount not in mounts:
        fail(f"the cargo build step has no cache mount of {target_mount}: every code change would rebuild librdkafka")
    if not release:
        command = re.sub(r"\s--release(?=\s|$)", "", command)
    env = dict(os.environ)
    # The cache mount of WORKDIR/target: the repository's own (warm) target directory.
    env["CARGO_TARGET_DIR"] = os.path.join(ROOT, "target")
    env["HUGGY_BRIDGE_COMMIT"] = commit
    subprocess.run(["cargo", "fetch", "--locked"], cwd=src, env=env, check=True)
    env["CARGO_NET_OFFLINE"] = "true"
    print(f"in the context: {command}  (HUGGY_BRIDGE_COMMIT={commit}, offline)", flush=True)
    started = time.monotonic()
    subprocess.run(["bash", "-c", command], cwd=src, env=env, check=True)
    print(f"build stage: ok in {time.monotonic() - started:.0f} s")
    binary = os.path.join(ROOT, "target", "release" if release else "debug", "huggy-bridge")
    kept = os.path.join(ROOT, "target", "image-check", "huggy-bridge")
    shutil.copy2(binary, kept)  # the binary of this build, before another build overwrites it
    return kept


# ---------------------------------------------------------------------------------------------
# Runtime stage
# ---------------------------------------------------------------------------------------------


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def runtime_contract(binary, commit):
    """Runs in a private mount namespace, as root (see the module's doc)."""
    instrs = instructions(DOCKERFILE)
    runtime = stages(instrs)[-1]
    user = [rest for word, rest in runtime if word == "USER"]
    volumes = [v for word, rest in runtime if word == "VOLUME" for v in json_or_shell(rest) if word == "VOLUME"]
    if not user or not re.fullmatch(r"\d+:\d+", user[-1]):
        fail("the runtime stage sets no numeric USER uid:gid (runAsNonRoot needs one)")
    uid, gid = map(int, user[-1].split(":"))
    if uid == 0:
        fail("the runtime stage runs as root")
    if len(volumes) != 1:
        fail(f"expected one VOLUME, found {volumes}")
    volume = volumes[0]
    copies = [flags_and_args(rest)[1] for word, rest in runtime if word == "COPY"]
    image_binary = [args[-1] for args in copies if args[-1].endswith("/huggy-bridge")]
    entrypoint = json_or_shell([rest for word, rest in runtime if word == "ENTRYPOINT"][-1])
    cmd = json_or_shell([rest for word, rest in runtime if word == "CMD"][-1])
    health = [rest for word, rest in runtime if word == "HEALTHCHECK"][-1]
    health_cmd = json_or_shell(health.split(" CMD ", 1)[1])
    mkdirs = [w for word, rest in runtime if word == "RUN" for step in rest.split("&&")
              if step.strip().startswith("mkdir -p") for w in shlex.split(step)[2:]]
    if len(image_binary) != 1:
        fail("the runtime stage does not COPY the binary to a path ending in /huggy-bridge")
    image_binary = image_binary[0]
    # The init process (tini) is not installed here: the daemon runs as what tini would start.
    argv = [a for a in entrypoint if a != "--" and "tini" not in a] + cmd
    if argv[0] != image_binary:
        fail(f"the entrypoint does not run {image_binary}: {entrypoint}")

    # The mounts: a tmpfs over the volume's parent (hides the host's), the volume laid out as the
    # image's RUN line makes it, a tmpfs over the binary's directory holding the binary.
    parent = os.path.dirname(volume)
    bindir = os.path.dirname(image_binary)
    for mp in (parent, bindir):
        subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", mp], check=True)
    # Only what the image creates on the volume: anything else would be made on the host's disk.
    for d in [volume] + [d for d in mkdirs if d.startswith(volume + "/")]:
        os.makedirs(d, exist_ok=True)
    for dirpath, dirnames, _ in os.walk(volume):
        os.chown(dirpath, uid, gid)
    shutil.copy2(binary, image_binary)
    os.chmod(image_binary, 0o755)
    subprocess.run(["mount", "--bind", volume, volume], check=True)
    # Read-only: every mount but the volume and the kernel's own file systems. `remount,bind,ro`
    # changes this namespace's view of a mount only, never the file system underneath.
    keep = {volume, "/proc", "/sys", "/dev"}
    mountpoints = []
    for line in open("/proc/self/mountinfo"):
        mp = line.split()[4].replace("\\040", " ")
        if mp in keep or any(mp.startswith(k + "/") for k in ("/proc", "/sys", "/dev")):
            continue
        mountpoints.append(mp)
    for mp in mountpoints:
        r = subprocess.run(["mount", "-o", "remount,bind,ro", mp], capture_output=True, text=True)
        if r.returncode != 0 and mp in ("/", parent, bindir):
            fail(f"cannot make {mp} read-only: {r.stderr.strip()}")
    for probe_path in ("/", "/tmp", parent, bindir):
        try:
            with tempfile.TemporaryFile(dir=probe_path):
                fail(f"{probe_path} is still writable")
        except OSError:
            pass

    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": volume}
    env.update(env_of(runtime))
    http_port, admin_port = free_port(), free_port()
    for key, port in (("HUGGY_BRIDGE_HTTP__LISTEN", http_port), ("HUGGY_BRIDGE_ADMIN__LISTEN", admin_port)):
        if key not in env:
            fail(f"the image does not set {key}")
        env[key] = f"127.0.0.1:{port}"
    # No broker: spool mode accepts and rides out the outage, as it must at a cluster's first start.
    env["HUGGY_BRIDGE_KAFKA__BROKERS"] = f"127.0.0.1:{free_port()}"
    env["HUGGY_BRIDGE_HUGGY__TOKENS"] = "image-check-token"
    as_user = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--inh-caps=-all",
               "--bounding-set=-all", "--no-new-privs"]

    version = subprocess.run(as_user + [image_binary, "--version"], env=env, cwd="/", capture_output=True,
                             text=True, check=True).stdout.strip()
    if f"commit {commit}," not in version or "spool format" not in version:
        fail(f"--version does not name the commit {commit} and the spool format: {version}")
    print(f"--version: {version}")

    daemon = subprocess.Popen(as_user + argv, env=env, cwd="/", stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output = []  # read from a pipe: a file open for writing would keep its mount from turning read-only
    reader = threading.Thread(target=lambda: output.extend(daemon.stdout), daemon=True)
    reader.start()

    def daemon_log():
        return b"".join(output).decode(errors="replace")[-4000:]

    def wait_for(what, check, timeout=120):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if daemon.poll() is not None:
                fail(f"the daemon exited with {daemon.returncode} while waiting for {what}:\n{daemon_log()}")
            if check():
                return
            time.sleep(0.2)
        daemon.kill()
        fail(f"timed out waiting for {what}:\n{daemon_log()}")

    try:
        probe = lambda extra: subprocess.run(as_user + health_cmd + extra, env=env, cwd="/",
                                             capture_output=True).returncode == 0
        wait_for("the HEALTHCHECK command (" + " ".join(health_cmd) + ")", lambda: probe([]))
        wait_for("probe --ready (readiness)", lambda: probe(["--ready"]))
        with open(f"/proc/{daemon.pid}/status") as f:
            uids = [l.split()[1:] for l in f if l.startswith("Uid:")][0]
        if set(map(int, uids)) != {uid}:
            fail(f"the daemon runs with uids {uids}, not {uid}")
        body = json.dumps({"token": "image-check-token", "time": int(time.time()),
                           "messages": {"receivedMessage": [{"id": "image-check-1", "chat": {"id": 5}}]}})
        req = urllib.request.Request(f"http://127.0.0.1:{http_port}{env.get('HUGGY_BRIDGE_HTTP__PATH', '/webhooks/huggy')}",
                                     data=body.encode(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            if resp.status // 100 != 2:
                fail(f"the webhook answered {resp.status}")
        spool = env["HUGGY_BRIDGE_SPOOL__DIR"]
        segments = [f for f in os.listdir(spool) if f.startswith("segment-")]
        if not segments or not spool.startswith(volume + "/"):
            fail(f"no segment in {spool} on the volume after a 2xx: {os.listdir(spool)}")
        owners = {os.stat(os.path.join(spool, f)).st_uid for f in os.listdir(spool)}
        if owners != {uid}:
            fail(f"spool files owned by {owners}, not {uid}")
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=30).read().decode()
        info = [l for l in metrics.splitlines() if l.startswith("huggy_bridge_build_info{")]
        if not info or f'commit="{commit}"' not in info[0]:
            fail(f"huggy_bridge_build_info does not name commit {commit}: {info}")
        print(f"running as uid {uid} on a read-only root: healthy, ready, a batch made durable in {spool}")
        daemon.send_signal(signal.SIGTERM)
        try:
            code = daemon.wait(timeout=60)
        except subprocess.TimeoutExpired:
            daemon.kill()
            fail(f"SIGTERM did not stop the daemon within 60 s:\n{daemon_log()}")
        if code != 0:
            fail(f"the daemon exited with {code} after SIGTERM:\n{daemon_log()}")
        reader.join(timeout=10)
        if "Read-only file system" in daemon_log():
            fail(f"the daemon tried to write outside its volume:\n{daemon_log()}")
        print("SIGTERM: exit 0; runtime contract: ok")
    finally:
        if daemon.poll() is None:
            daemon.kill()


def main():
    args = sys.argv[1:]
    if "--inside" in args:  # re-executed in the private mount namespace
        binary, commit = args[args.index("--inside") + 1 : args.index("--inside") + 3]
        runtime_contract(binary, commit)
        return
    release = "--release" in args
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    commit = commit or "image-check"
    binary = build(release, commit)
    if "--build-only" in args:
        return
    missing = [t for t in ("unshare", "setpriv", "mount") if not shutil.which(t)]
    if os.geteuid() != 0 or missing:
        why = "not root" if os.geteuid() != 0 else f"missing {missing}"
        if STRICT:
            fail(f"runtime contract not checked: {why}")
        print(f"runtime contract: skipped ({why})", file=sys.stderr)
        return
    subprocess.run(["unshare", "--mount", "--propagation", "private", sys.executable, os.path.abspath(__file__),
                    "--inside", binary, commit], check=True)


if __name__ == "__main__":
    try:
        main()
    except subprocess.CalledProcessError as e:
        fail(f"{' '.join(map(str, e.cmd))}: exit status {e.returncode}")
