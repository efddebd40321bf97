"""compare.py --slurm's grid.sbatch on a real SLURM: a single-node cluster (munged, slurmctld, slurmd; CPU only)
started in a temporary folder. The grid finishes by itself although one task gets SIGUSR1 mid-run (what SLURM
sends two minutes before a time limit: the task checkpoints, exits 75 and requeues itself) and another is
requeued mid-run as a preemption does (SIGTERM: it checkpoints, exits 75, SLURM requeues it); both end with the
results of an uninterrupted run. Skipped where SLURM is not installed (.ci/run installs slurm-wlm and munge)."""

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
from test_scripts import ROOT, SCRIPTS, TINY, metrics, results  # puts the scripts' folder on sys.path

import compare  # noqa: E402

SBIN = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])
DAEMONS = {name: shutil.which(name, path=SBIN) for name in ("munged", "slurmctld", "slurmd")}
pytestmark = [
    pytest.mark.skipif(shutil.which("sbatch") is None or None in DAEMONS.values(),
                       reason="SLURM is not installed (no sbatch, munged, slurmctld or slurmd): "
                              "apt-get install slurm-wlm munge, as .ci/run does"),
    pytest.mark.skipif(os.geteuid() != 0, reason="slurmd launches jobs as their user: it needs root"),
]
# The grid: 2 algorithms x 2 seeds of the tiny runs, 6 epochs rather than 3 so that a stop at step 2 of 24 falls
# well inside fixmatch's run (the grid fixture pauses the script until the signal arrives: 24 steps take about
# 7 s on one VM, 1 s on another, and SLURM's requeue may take longer). One CPU per task: two tasks at a time.
ALGORITHMS, SEEDS = ["fixmatch", "supervised"], [0, 1]
FLAGS = TINY[:TINY.index("--n-labeled")] + TINY[TINY.index("--n-labeled") + 2:] + SCRIPTS["fixmatch"]
FLAGS[FLAGS.index("--epochs") + 1] = "6"
TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_conf(root: str, cpus: int) -> str:
    """A single-node cluster in `root`: CPU only, no cgroups, no accounting, on unused ports, state and logs in
    root. Short intervals keep the test fast: the scheduler runs every second, and a requeued task may start
    again after 6 s (cred_expire + 1) rather than 121."""
    return "\n".join([
        "ClusterName=ssltest", "SlurmctldHost=localhost(127.0.0.1)",
        f"SlurmctldPort={free_port()}", f"SlurmdPort={free_port()}",
        "SlurmUser=root", "SlurmdUser=root", "AuthType=auth/munge", "CredType=cred/munge",
        f"AuthInfo=socket={root}/munge/munge.socket,cred_expire=5",
        f"StateSaveLocation={root}/state", f"SlurmdSpoolDir={root}/spool",
        f"SlurmctldPidFile={root}/slurmctld.pid", f"SlurmdPidFile={root}/slurmd.pid",
        f"SlurmctldLogFile={root}/slurmctld.log", f"SlurmdLogFile={root}/slurmd.log",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none", "JobCompType=jobcomp/none", "MpiDefault=none",
        "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU", "SchedulerParameters=sched_interval=1",
        "MessageTimeout=5", "SlurmdTimeout=30", "KillWait=15", "MinJobAge=600", "ReturnToService=2",
        f"NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=1000 State=UNKNOWN",
        "PartitionName=test Nodes=localhost Default=YES MaxTime=INFINITE State=UP", ""])


def tail(path: str, lines: int = 15) -> str:
    if not os.path.exists(path):
        return f"({path} does not exist)"
    with open(path, errors="replace") as f:
        return f"--- {path}\n" + "".join(f.readlines()[-lines:])


def slurm(env: dict, *command: str) -> str:
    return subprocess.run(command, env=env, capture_output=True, text=True, check=True, timeout=30).stdout


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Start munged, slurmctld and slurmd in the foreground (their pids are ours), wait for the node to be idle;
    yield (environment for the SLURM commands, folder with the logs). Afterwards, failed or not: cancel every job,
    wait for them to end, and stop the three daemons by their pids."""
    root = str(tmp_path_factory.mktemp("slurm"))
    for folder in ("munge", "state", "spool"):
        os.makedirs(os.path.join(root, folder))
    with open(os.path.join(root, "munge", "munge.key"), "wb") as f:
        f.write(os.urandom(1024))
    os.chmod(os.path.join(root, "munge", "munge.key"), 0o600)
    conf = os.path.join(root, "slurm.conf")
    with open(conf, "w") as f:
        f.write(slurm_conf(root, min(2, os.cpu_count() or 1)))
    # sbatch passes its environment on to the job, and a grid task runs the first `python` on that PATH: this
    # interpreter's folder first, so that the tasks run the python running the tests (with torch), activated or not.
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    env = dict(os.environ, SLURM_CONF=conf, PATH=path)
    m = os.path.join(root, "munge")
    commands = [
        [DAEMONS["munged"], "-F", "--force", f"--key-file={m}/munge.key", f"--socket={m}/munge.socket",
         f"--pid-file={m}/munged.pid", f"--log-file={m}/munged.log", f"--seed-file={m}/munged.seed"],
        [DAEMONS["slurmctld"], "-D", "-i", "-f", conf],
        [DAEMONS["slurmd"], "-D", "-N", "localhost", "-f", conf],
    ]
    daemons, logs = [], [os.path.join(m, "munged.log"), os.path.join(root, "slurmctld.log"),
                         os.path.join(root, "slurmd.log")]
    try:
        for command, log in zip(commands, logs):
            with open(log + ".out", "w") as out:
                daemons.append(subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT))
            if command[0] == DAEMONS["munged"]:
                wait_for(lambda: os.path.exists(f"{m}/munge.socket"), 10, "munged's socket", logs)
        wait_for(lambda: node_state(env) == "idle", 30, "the node to be idle", logs)
        yield env, logs
    finally:
        try:
            subprocess.run(["scancel", "--full", "--user", "root"], env=env, capture_output=True, timeout=30)
            wait_for(lambda: not slurm(env, "squeue", "-h"), 30, "the jobs to end", logs)
        except Exception:  # the cluster never came up, or will not answer: stop it all the same
            pass
        for process in reversed(daemons):
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for pid in stepds_of(root):  # a job step whose slurmd is gone waits for it forever, deaf to SIGTERM
            os.kill(pid, 9)


def pids_where(matches) -> list[int]:
    """The pids of the processes for which matches(pid) holds; one gone meanwhile (OSError) is skipped."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            if matches(pid):
                found.append(int(pid))
    return found


def stepds_of(root: str) -> list[int]:
    """The slurmstepd processes of this cluster: those working in its folder (slurmd's, where its log is)."""
    def is_stepd(pid: str) -> bool:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip() == "slurmstepd" and os.readlink(f"/proc/{pid}/cwd").startswith(root)
    return pids_where(is_stepd)


def node_state(env: dict) -> str:
    try:
        return slurm(env, "sinfo", "-h", "-N", "-o", "%T").strip()
    except subprocess.SubprocessError:
        return ""


def wait_for(condition, timeout_s: float, what: str, logs: list[str]) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout_s} s for {what}\n" + "\n".join(tail(log) for log in logs))
        time.sleep(0.1)


def run_pid(folder: str) -> int | None:
    """The pid of the script that trains into `folder` (its --out), or None while there is none."""
    def trains_into_folder(pid: str) -> bool:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().decode(errors="replace").split("\0")
        return "python" in os.path.basename(argv[0]) and folder in argv
    return next(iter(pids_where(trains_into_folder)), None)


def signal_waits_or_runs(pid: int, signum: int) -> bool:
    """Whether the stopped process `pid` has `signum` pending, runs again (SLURM sends SIGCONT before SIGTERM),
    or is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            status = dict(line.split(":", 1) for line in f if ":" in line)
    except OSError:
        return True
    pending = int(status["SigPnd"], 16) | int(status["ShdPnd"], 16)
    return bool(pending >> (signum - 1) & 1) or not status["State"].strip().startswith("T")


def task_log(out: str, job: str, task: int) -> str:
    path = os.path.join(out, f"slurm-{job}_{task}.log")
    if not os.path.exists(path):
        return ""
    with open(path, errors="replace") as f:
        return f.read()


@pytest.fixture(scope="module")
def grid(cluster, tmp_path_factory, cifar_dir):
    """Write the tiny grid with compare.py --slurm, submit it, and as fixmatch's two tasks reach step 2: send
    SIGUSR1 to task 0's batch shell (`scancel --batch --signal=USR1`, what --signal=B:USR1@120 makes SLURM do
    before the time limit) and requeue task 1 (`scontrol requeue`, what preemption in PreemptMode=REQUEUE does);
    wait for the array to end. Returns (runs, grid folder, array job id, seconds it took).

    Each script is paused (SIGSTOP) from step 2 until its signal reaches it: on a fast CPU the 24 steps end
    sooner than SLURM delivers a signal, and the stop would then come too late to be tested."""
    env, logs = cluster
    out = str(tmp_path_factory.mktemp("grid"))
    argv = ["--algorithms", *ALGORITHMS, "--seeds", *map(str, SEEDS), "--n-labeled", "20", "--out", out, "--slurm",
            "--", *FLAGS, "--data-dir", cifar_dir]
    assert compare.main(argv) == 0
    runs = [os.path.join(out, f"{a}_n20_seed{s}") for a in ALGORITHMS for s in SEEDS]  # the array's order
    start = time.monotonic()
    job = slurm(env, "sbatch", "--parsable", "--cpus-per-task=1", os.path.join(out, "grid.sbatch")).strip()
    # Per task: the command that stops it, and the signal that then reaches its script (SIGUSR1 passed on by the
    # batch shell, SIGTERM from SLURM).
    stops = {0: (["scancel", "--batch", "--signal=USR1", f"{job}_0"], signal.SIGUSR1),
             1: (["scontrol", "requeue", f"{job}_1"], signal.SIGTERM)}
    paused = {}  # task -> its script's pid, stopped at step 2 (both before either signal: they run side by side)
    while len(paused) < len(stops) and time.monotonic() - start < TIMEOUT_S:
        for task in stops.keys() - paused.keys():
            if "step 2/24 " in task_log(out, job, task) and (pid := run_pid(runs[task])) is not None:
                os.kill(pid, signal.SIGSTOP)
                paused[task] = pid
        time.sleep(0.05)
    for task, pid in paused.items():
        command, signum = stops[task]
        # SLURM 22.05 delivers scancel's signal at once, but while tasks of the same array are pending it
        # answers "Job can not be altered now, try again later" and scancel retries every 5 s: 2 s will do.
        with contextlib.suppress(subprocess.TimeoutExpired):
            subprocess.run(command, env=env, capture_output=True, timeout=2)
        with contextlib.suppress(AssertionError):  # not within 30 s: go on, and the tests below say so
            wait_for(lambda: signal_waits_or_runs(pid, signum), 30, "the signal", logs)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    wait_for(lambda: not slurm(env, "squeue", "-h", "-j", job), TIMEOUT_S - (time.monotonic() - start),
             "the array job to end", logs + [os.path.join(out, f"slurm-{job}_{t}.log") for t in range(len(runs))])
    return runs, out, job, time.monotonic() - start


def test_grid_runs_to_the_end_on_slurm_and_reports(grid, cluster):
    """Every task completed with its results.json, and compare.py --report aggregates the folder."""
    runs, out, job, _ = grid
    env, _ = cluster
    for task, folder in enumerate(runs):
        assert os.path.exists(os.path.join(folder, "results.json")), task_log(out, job, task)
        state = slurm(env, "scontrol", "show", "job", f"{job}_{task}")
        assert "JobState=COMPLETED" in state and "ExitCode=0:0" in state, state
    assert compare.main(["--report", "--out", out]) == 0
    with open(os.path.join(out, "results.md")) as f:
        report = f.read()
    assert "fixmatch" in report and "supervised" in report and "## Unfinished runs" not in report


@pytest.mark.parametrize("task, signal, requeued_by", [(0, "SIGUSR1", "the batch script"), (1, "SIGTERM", "SLURM")])
def test_a_task_stopped_mid_run_is_requeued_and_ends_as_an_uninterrupted_run(grid, cluster, task, signal,
                                                                              requeued_by, cifar_dir, tmp_path):
    """The task's log says where it stopped and where it resumed; SLURM counts one restart; the run's metrics
    (timing aside) and results equal the same run's without the stop."""
    runs, out, job, _ = grid
    env, _ = cluster
    log = task_log(out, job, task)
    stopped = [line for line in log.splitlines() if line.startswith(f"stopped by {signal} after step ")]
    assert len(stopped) == 1, log
    step = int(stopped[0].split()[5].rstrip(";"))
    assert 2 <= step < 24 and f"resume from step {step}" in stopped[0]
    assert f"resuming {runs[task]} from step {step}" in log
    assert ("requeueing task 0" in log) == (requeued_by == "the batch script"), log
    assert "Restarts=1" in slurm(env, "scontrol", "show", "job", f"{job}_{task}")
    reference = str(tmp_path / "reference")  # the same run, uninterrupted, here, as a process of its own as the tasks
    # are (the tests' own process computes convolutions without oneDNN, conftest.py; a script's process with it)
    command = [sys.executable, os.path.join(ROOT, "fixmatch.py"), "--n-labeled", "20", "--seed", str(SEEDS[task]),
               *FLAGS, "--data-dir", cifar_dir, "--out", reference]
    assert subprocess.run(command, capture_output=True, timeout=300).returncode == 0
    assert metrics(runs[task]) == metrics(reference) and results(runs[task]) == results(reference)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v", "-s"]))
