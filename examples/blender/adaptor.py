#!/usr/bin/env python3
"""The renderq adaptor for Blender: speaks renderq's adaptor protocol and
keeps one Blender as its child (`blender -b --factory-startup --python
adaptor_blender.py`), which loads a scene once and renders the frames of
many runs from it.

Blender talks to this process on two pipes; its banner and logs go to
standard error, since standard output belongs to the protocol. Every line
Blender sends is passed on only while its run is the one in progress, and
a run's first answer is its only one: nothing of a finished, cancelled or
crashed run reaches the worker after its answer.

A `cancel` for the run in progress kills that Blender (SIGKILL) and answers
the run `fail` at once; a new Blender is started for the next run, which
loads its scene again. That is what stops a long frame within milliseconds
in Blender 3.4: Cycles in background mode looks for a break only between
batches of samples, which are seconds to tens of seconds long (a SIGINT
break, Blender's only way in from outside, took 14.6 s on a 640x360
frame), and a second SIGINT exits Blender. A `cancel` for a run already
answered gets no answer.

Run it as the adaptor program: `program = "python3"`,
`args = ["{config_dir}/examples/blender/adaptor.py"]`. `BLENDER` names the
Blender binary (default `blender`).
"""

import json
import os
import subprocess
import sys
import threading

HERE = os.path.dirname(os.path.abspath(__file__))
BLENDER = os.environ.get("BLENDER", "blender")
output = threading.Lock()


def send(message):
    with output:
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()


class Runs:
    """The run in progress and the Blender rendering it. Every answer goes
    through here, under one lock, so a run is answered exactly once."""

    def __init__(self):
        self.lock = threading.Lock()
        self.current = None  # the id of the run not answered yet
        self.blender = None  # the Blender it was given to

    def begin(self, run_id, blender):
        with self.lock:
            self.current, self.blender = run_id, blender

    def relay(self, blender, message):
        """Passes on what `blender` says about the run in progress."""
        with self.lock:
            if blender is not self.blender or message.get("id") != self.current:
                return  # a run already answered: too late
            if message.get("type") in ("result", "fail"):
                self.current = None
            send(message)

    def fail(self, run_id, blender, reason):
        """Answers the run `fail` if it is still `blender`'s and unanswered;
        returns whether it did."""
        with self.lock:
            if run_id is None or run_id != self.current or blender is not self.blender:
                return False
            self.current = None
            send({"type": "fail", "id": run_id, "message": reason})
            return True

    def in_progress(self):
        with self.lock:
            return self.current


class Blender:
    """One Blender process, and the thread that reads what it says."""

    def __init__(self, runs, init_data):
        self.runs = runs
        commands_in, commands_out = os.pipe()
        answers_in, answers_out = os.pipe()
        self.process = subprocess.Popen(
            [BLENDER, "-b", "--factory-startup",
             "--python", os.path.join(HERE, "adaptor_blender.py"),
             "--", str(commands_in), str(answers_out)],
            stdin=subprocess.DEVNULL,
            stdout=sys.stderr,
            pass_fds=(commands_in, answers_out),
            # Blender's temporary files go in the adaptor's working folder,
            # which renderq removes with the adaptor even when it kills it.
            env=dict(os.environ, TMPDIR=os.getcwd()),
        )
        os.close(commands_in)
        os.close(answers_out)
        self.commands = os.fdopen(commands_out, "w")
        self.answers = os.fdopen(answers_in, "r")
        self.ready = threading.Event()
        self.killed = False  # by a cancel, which answers its run itself
        threading.Thread(target=self.read, daemon=True).start()
        self.tell({"type": "init", "init_data": init_data})

    def tell(self, message):
        self.commands.write(json.dumps(message) + "\n")
        self.commands.flush()

    def read(self):
        for line in self.answers:
            message = json.loads(line)
            if message.get("type") == "ready":
                self.ready.set()
            else:
                self.runs.relay(self, message)
        # It exited: a run it had not answered fails now, not at the
        # worker's timeout.
        code = self.process.wait()
        if not self.killed:
            self.runs.fail(self.runs.in_progress(), self, f"Blender exited with code {code}")
        self.ready.set()

    def alive(self):
        return self.process.poll() is None

    def kill(self):
        self.killed = True
        self.process.kill()
        self.process.wait()


def main():
    runs = Runs()
    blender = None
    init_data = {}
    for line in sys.stdin:
        message = json.loads(line)
        kind = message.get("type")
        if kind == "init":
            init_data = message.get("init_data", {})
            blender = Blender(runs, init_data)
            blender.ready.wait()
            if not blender.alive():
                sys.exit("renderq adaptor: Blender exited before it was ready")
            send({"type": "ready"})
        elif kind == "run":
            if blender is None or not blender.alive():
                blender = Blender(runs, init_data)
            runs.begin(message["id"], blender)
            try:
                blender.tell(message)
            except OSError as error:
                runs.fail(message["id"], blender, f"Blender is gone: {error}")
        elif kind == "cancel":
            run_id = message.get("id")
            if run_id is not None and run_id == runs.in_progress():
                blender.kill()
                print(f"renderq adaptor: killed Blender to cancel {run_id}", file=sys.stderr)
                # Unless it answered just before it died.
                runs.fail(run_id, blender, "cancelled")
                # The next run's Blender starts loading now.
                blender = Blender(runs, init_data)
        elif kind == "stop":
            if blender is not None and blender.alive():
                try:
                    blender.tell({"type": "stop"})
                    blender.process.wait(timeout=3)
                except (OSError, subprocess.TimeoutExpired):
                    blender.kill()
            send({"type": "stopped"})
            return


if __name__ == "__main__":
    main()
