"""``jds launch``: the variables each process gets, rank-prefixed output, stopping the job when
one process fails or the launcher is signalled, hostfiles and the ssh/pdsh commands.

Children are tiny ``python -c`` programs (no JAX). Hostfile mode runs end to end through a fake
``ssh`` on ``PATH`` that runs the remote shell line locally; no real ssh is used.
"""

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jds import launch
from jds.launch import Host, main, parse_hostfile

SHOW_ENV = (
    "import json, os, sys; "
    "keys = [k for k in os.environ if k.startswith(('JDS_', 'JAX_PLATFORMS', 'XLA_FLAGS'))]; "
    "print(json.dumps({'env': {k: os.environ[k] for k in keys}, 'argv': sys.argv[1:]})); "
    "print('to stderr', os.environ['JDS_PROCESS_ID'], file=sys.stderr)"
)


def by_rank(text):
    """``{rank: [line, ...]}`` from ``[rank i] line`` output; other lines under None."""
    out = {}
    for line in text.splitlines():
        if line.startswith("[rank "):
            rank, _, rest = line[len("[rank "):].partition("] ")
            out.setdefault(int(rank), []).append(rest)
        else:
            out.setdefault(None, []).append(line)
    return out


def reports(text):
    """The JSON each child printed, by rank."""
    return {r: json.loads(lines[0]) for r, lines in by_rank(text).items() if r is not None}


def test_local_children_get_their_variables_and_prefixed_output(capsys, monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x --xla_force_host_platform_device_count=8")
    assert main(["--nproc", "2", "--cpu-devices", "3", "--init-timeout", "40",
                 "--", "-c", SHOW_ENV, "an arg"]) == 0
    cap = capsys.readouterr()
    got = reports(cap.out)
    assert sorted(got) == [0, 1]
    coords = {got[r]["env"]["JDS_COORDINATOR"] for r in got}
    assert len(coords) == 1 and coords.pop().startswith("127.0.0.1:")
    for rank, rep in got.items():
        env = rep["env"]
        assert env["JDS_PROCESS_ID"] == str(rank)  # the prefix names the right process
        assert env["JDS_NUM_PROCESSES"] == "2"
        assert env["JAX_PLATFORMS"] == "cpu" and env["JDS_CPU_COLLECTIVES"] == "gloo"
        # the device count is replaced, other flags are kept
        assert env["XLA_FLAGS"].split() == ["--xla_dump_to=/tmp/x",
                                            "--xla_force_host_platform_device_count=3"]
        assert env["JDS_LOCAL_DEVICE_COUNT"] == "3" and env["JDS_INIT_TIMEOUT"] == "40"
        assert "JDS_FAILURE_TIMEOUT" not in env and "JDS_LOCAL_DEVICE_IDS" not in env
        assert rep["argv"] == ["an arg"]
    err = by_rank(cap.err)
    assert err[0] == ["to stderr 0"] and err[1] == ["to stderr 1"]


def test_local_without_cpu_devices_leaves_xla_flags_and_splits_devices(capsys, monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x")
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    port = launch.free_port()
    assert main(["--nproc", "3", "--devices-per-proc", "2", "--master-port", str(port),
                 "--failure-timeout", "7", "--", "-c", SHOW_ENV]) == 0
    got = reports(capsys.readouterr().out)
    for rank in range(3):
        env = got[rank]["env"]
        assert env["JDS_COORDINATOR"] == f"127.0.0.1:{port}"
        assert env["XLA_FLAGS"] == "--xla_dump_to=/tmp/x"
        assert "JAX_PLATFORMS" not in env and "JDS_CPU_COLLECTIVES" not in env
        assert env["JDS_LOCAL_DEVICE_IDS"] == f"{2 * rank},{2 * rank + 1}"
        assert env["JDS_FAILURE_TIMEOUT"] == "7"


FAIL_ONE = """
import os, signal, sys, time
if os.environ["JDS_PROCESS_ID"] == "1":
    {action}
print("waiting", flush=True)
time.sleep(60)
"""


def test_a_failing_process_stops_the_others_and_returns_its_code(capsys):
    t0 = time.monotonic()
    rc = main(["--nproc", "2", "--", "-c", FAIL_ONE.format(action="sys.exit(3)")])
    elapsed = time.monotonic() - t0
    err = capsys.readouterr().err
    assert rc == 3
    assert elapsed < 10, f"the sleeping process was not stopped ({elapsed:.1f} s)"
    assert "jds launch: process 1 (pid " in err
    assert "exited with code 3; stopping the other processes" in err
    assert "process 0: signal SIGTERM, process 1: code 3" in err


def test_a_process_killed_by_a_signal_is_named_with_the_signal(capsys):
    t0 = time.monotonic()
    rc = main(["--nproc", "2", "--",
               "-c", FAIL_ONE.format(action="os.kill(os.getpid(), signal.SIGKILL)")])
    err = capsys.readouterr().err
    assert rc == 128 + signal.SIGKILL
    assert time.monotonic() - t0 < 10
    assert "process 1 (pid " in err and "exited with signal SIGKILL" in err


def test_a_process_ignoring_sigterm_is_killed_after_the_failure_timeout(capsys, tmp_path):
    ready = tmp_path / "ready"
    code = f"""
import os, signal, sys, time
if os.environ["JDS_PROCESS_ID"] == "0":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    open({str(ready)!r}, "w").close()
    time.sleep(60)
while not os.path.exists({str(ready)!r}):
    time.sleep(0.01)
sys.exit(4)
"""
    t0 = time.monotonic()
    rc = main(["--nproc", "2", "--failure-timeout", "1", "--", "-c", code])
    elapsed = time.monotonic() - t0
    err = capsys.readouterr().err
    assert rc == 4
    assert 1 <= elapsed < 8
    assert "process 0 still running 1 s after SIGTERM" in err and "sending SIGKILL" in err
    assert "process 0: signal SIGKILL, process 1: code 4" in err


def test_sigterm_to_the_launcher_is_passed_on_to_the_processes(tmp_path):
    code = f"""
import os, signal, sys, time
def stop(sig, frame):
    print("got", signal.Signals(sig).name, flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
open(os.path.join({str(tmp_path)!r}, os.environ["JDS_PROCESS_ID"]), "w").close()
time.sleep(60)
"""
    proc = subprocess.Popen([sys.executable, "-m", "jds.launch", "--nproc", "2", "--", "-c",
                             code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while not ((tmp_path / "0").exists() and (tmp_path / "1").exists()):
        assert time.monotonic() < deadline and proc.poll() is None, "children did not start"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=15)
    assert proc.returncode == 128 + signal.SIGTERM
    assert sorted(by_rank(out)[r][0] for r in (0, 1)) == ["got SIGTERM", "got SIGTERM"]
    assert "received SIGTERM; passing it on" in err


def test_missing_program_and_missing_mode_are_errors_for_people(capsys):
    assert main(["--nproc", "2", "--", "no-such-program-jds"]) == 2
    assert "could not start process 0 (no-such-program-jds)" in capsys.readouterr().err
    assert main(["--", "-c", "pass"]) == 2
    assert "--nproc N" in capsys.readouterr().err
    assert main(["--nproc", "2"]) == 2
    assert "no command to launch" in capsys.readouterr().err


def test_commands_run_under_this_python_when_they_are_python():
    py = sys.executable
    assert launch.resolve_command(["--", "train.py", "-x"]) == [py, "train.py", "-x"]
    assert launch.resolve_command(["-m", "jds.cli", "train"]) == [py, "-m", "jds.cli", "train"]
    assert launch.resolve_command(["jds", "train"]) == ["jds", "train"]
    assert launch.with_device_count(None, 4) == "--xla_force_host_platform_device_count=4"
    assert launch.with_device_count("--a --xla_force_host_platform_device_count=8 --b",
                                    2).split() == [
        "--a", "--b", "--xla_force_host_platform_device_count=2"]


# --- hostfile mode ---------------------------------------------------------------------------

HOSTFILE = """\
# DeepSpeed-style hostfile
worker-0 slots=8

worker-1   slots=4   # the small one
  worker-2
"""


def test_hostfile_parsing_keeps_order_slots_and_line_numbers(tmp_path):
    f = tmp_path / "hostfile"
    f.write_text(HOSTFILE)
    assert parse_hostfile(f) == [Host("worker-0", 8, 2), Host("worker-1", 4, 4),
                                 Host("worker-2", None, 5)]


@pytest.mark.parametrize("bad, line, why", [
    ("a slots=2\nb slots=two\n", 2, "is not 'HOST slots=N'"),
    ("a slots=2\n\n# c\nb slots=0\n", 4, "is not 'HOST slots=N'"),
    ("a slots=2 extra\n", 1, "is not 'HOST slots=N'"),
    ("a slots=2\nb slots=1\na slots=2\n", 3, "already listed on line 1"),
])
def test_bad_hostfile_lines_are_named_with_file_and_line(tmp_path, bad, line, why):
    f = tmp_path / "hosts"
    f.write_text(bad)
    with pytest.raises(ValueError, match=rf"hostfile .*hosts, line {line}: .*{why}"):
        parse_hostfile(f)


def test_empty_or_missing_hostfile_is_an_error(tmp_path, capsys):
    f = tmp_path / "hosts"
    f.write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="lists no hosts"):
        parse_hostfile(f)
    assert main(["--hostfile", str(tmp_path / "nope"), "--", "-c", "pass"]) == 2
    assert "does not exist (--hostfile)" in capsys.readouterr().err


def split_ssh(line):
    """(ssh argv before the host, host, the remote argv after cd/exec env, env, cwd)."""
    argv = shlex.split(line)
    assert argv[:4] == ["ssh", "-tt", "-o", "BatchMode=yes"]
    host, remote = argv[-2], shlex.split(argv[-1])
    assert remote[0] == "cd" and remote[2:5] == ["&&", "exec", "env"]
    rest = remote[5:]
    env = {}
    while "=" in rest[0] and not rest[0].startswith("/"):
        k, _, v = rest.pop(0).partition("=")
        env[k] = v
    return argv[4:-2], host, rest, env, remote[1]


def test_dry_run_prints_ssh_commands_with_the_coordinator_env_and_quoting(tmp_path, capsys,
                                                                           monkeypatch):
    monkeypatch.setenv("NCCL_DEBUG", "INFO")
    monkeypatch.setenv("UNRELATED_SECRET", "x")
    f = tmp_path / "hostfile"
    f.write_text("nodeA slots=8\nnodeB slots=8\n")
    cwd = tmp_path / "my run dir"
    assert main(["--hostfile", str(f), "--dry-run", "--chdir", str(cwd), "--master-port",
                 "6000", "--ssh-port", "2222", "--env", "WANDB_MODE=offline", "--",
                 "train.py", "--name", "run 1", "it's"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    for rank, (line, node) in enumerate(zip(lines, ("nodeA", "nodeB"), strict=True)):
        opts, host, cmd, env, where = split_ssh(line)
        assert opts == ["-p", "2222"] and host == node and where == str(cwd)
        assert cmd == [sys.executable, "train.py", "--name", "run 1", "it's"]
        assert env["JDS_COORDINATOR"] == "nodeA:6000"
        assert env["JDS_NUM_PROCESSES"] == "2" and env["JDS_PROCESS_ID"] == str(rank)
        assert env["JDS_LOCAL_DEVICE_COUNT"] == "8" and env["WANDB_MODE"] == "offline"
        assert env["NCCL_DEBUG"] == "INFO" and "UNRELATED_SECRET" not in env


def test_dry_run_pdsh_and_num_nodes(tmp_path, capsys):
    f = tmp_path / "hostfile"
    f.write_text("n1 slots=2\nn2 slots=2\nn3 slots=2\n")
    assert main(["--hostfile", str(f), "--dry-run", "--launcher", "pdsh", "--num-nodes", "2",
                 "--master-addr", "10.0.0.1", "--", "jds", "train"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    for rank, line in enumerate(lines):
        argv = shlex.split(line)
        assert argv[:6] == ["pdsh", "-S", "-R", "ssh", "-w", f"n{rank + 1}"]
        remote = argv[6]
        assert f"JDS_PROCESS_ID={rank}" in shlex.split(remote)
        assert "JDS_COORDINATOR=10.0.0.1:29500" in shlex.split(remote)
        assert shlex.split(remote)[-2:] == ["jds", "train"]
    assert main(["--hostfile", str(f), "--num-nodes", "4", "--", "jds"]) == 2
    assert "--num-nodes 4" in capsys.readouterr().err


@pytest.fixture
def fake_ssh(tmp_path, monkeypatch):
    """An ``ssh`` on PATH that runs the remote shell line here, as the remote sshd would."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    ssh = bin_dir / "ssh"
    ssh.write_text(f"#!{sys.executable}\nimport os, sys\n"
                   "os.execvp('sh', ['sh', '-c', sys.argv[-1]])\n")
    ssh.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return ssh


def test_hostfile_mode_runs_one_process_per_host_through_ssh(tmp_path, capsys, fake_ssh):
    f = tmp_path / "hostfile"
    f.write_text("nodeA slots=4\nnodeB slots=2\n")
    work = tmp_path / "work dir"
    work.mkdir()
    assert main(["--hostfile", str(f), "--chdir", str(work), "--", "-c",
                 SHOW_ENV + "; print(os.getcwd())", "arg with space", "$HOME"]) == 0
    out = by_rank(capsys.readouterr().out)
    for rank, slots in ((0, "4"), (1, "2")):
        rep = json.loads(out[rank][0])
        assert rep["argv"] == ["arg with space", "$HOME"]  # no word splitting or expansion
        assert rep["env"]["JDS_COORDINATOR"] == "nodeA:29500"
        assert rep["env"]["JDS_PROCESS_ID"] == str(rank)
        assert rep["env"]["JDS_LOCAL_DEVICE_COUNT"] == slots
        assert Path(out[rank][1]) == work


def test_hostfile_mode_stops_the_job_when_a_host_fails(tmp_path, capsys, fake_ssh):
    f = tmp_path / "hostfile"
    f.write_text("nodeA\nnodeB\n")
    t0 = time.monotonic()
    rc = main(["--hostfile", str(f), "--", "-c", FAIL_ONE.format(action="sys.exit(5)")])
    err = capsys.readouterr().err
    assert rc == 5 and time.monotonic() - t0 < 10
    assert "process 1 on host nodeB (pid " in err and "exited with code 5" in err
