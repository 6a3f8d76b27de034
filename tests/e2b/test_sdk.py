"""The unmodified e2b SDK (tests/e2b/requirements.txt) drives an agentos daemon's E2B API.

Run by scripts/test-e2b, which starts `agentos daemon --listen` and sets E2B_API_URL,
E2B_SANDBOX_URL and E2B_API_KEY for it. Each test says what an E2B user relies on.
"""

import asyncio
import hashlib
import os
import time
import unittest
import uuid

from e2b import AsyncSandbox, CommandExitException, Sandbox, SandboxQuery
from e2b.exceptions import (
    AuthenticationException,
    NotFoundException,
    SandboxException,
    TimeoutException,
)

# Sandboxes of this run carry this in their metadata, so that listings find only them.
RUN = uuid.uuid4().hex[:12]


def wait_for(what, done, limit=60):
    deadline = time.monotonic() + limit
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {limit} s for {what}")
        time.sleep(0.5)


class Sandboxes(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.sbx = Sandbox.create(metadata={"run": RUN, "role": "main"}, timeout=600)
        cls.other = Sandbox.create(metadata={"run": RUN, "role": "other"}, timeout=600)

    @classmethod
    def tearDownClass(cls):
        for sandbox in (cls.sbx, cls.other):
            try:
                sandbox.kill()
            except SandboxException:
                pass

    def test_a_command_s_output_and_exit_code(self):
        result = self.sbx.commands.run("echo hi")
        self.assertEqual((result.stdout, result.exit_code), ("hi\n", 0))
        with self.assertRaises(CommandExitException) as failed:
            self.sbx.commands.run("echo oops >&2; exit 3")
        self.assertEqual(failed.exception.exit_code, 3)
        self.assertEqual(failed.exception.stderr, "oops\n")

    def test_output_comes_to_callbacks_as_it_is_printed(self):
        seen = []
        self.sbx.commands.run("echo one; sleep 1; echo two", on_stdout=seen.append)
        self.assertEqual("".join(seen), "one\ntwo\n")
        self.assertGreaterEqual(len(seen), 2, "two writes a second apart came as one")

    def test_environment_directory_and_user(self):
        result = self.sbx.commands.run("echo $FOO; pwd; id -u; echo $BASH_VERSION", envs={"FOO": "bar"}, cwd="/tmp")
        foo, cwd, uid, bash = result.stdout.splitlines()
        self.assertEqual((foo, cwd, uid), ("bar", "/tmp", "1000"))
        self.assertTrue(bash, "commands run in GNU bash")
        self.assertEqual(self.sbx.commands.run("pwd").stdout, "/home/user\n")
        self.assertEqual(self.sbx.commands.run("id -u", user="root").stdout, "0\n")
        self.assertEqual(self.sbx.commands.run("python3 -c 'print(6 * 7)'").stdout, "42\n")

    def test_background_commands_are_listed_and_killed(self):
        handle = self.sbx.commands.run("sleep 600", background=True)
        self.assertIn(handle.pid, [p.pid for p in self.sbx.commands.list()])
        self.assertTrue(handle.kill())
        with self.assertRaises(CommandExitException):
            handle.wait()
        wait_for("the killed command to go", lambda: handle.pid not in [p.pid for p in self.sbx.commands.list()])
        self.assertFalse(self.sbx.commands.kill(handle.pid), "a gone process cannot be killed")

    def test_standard_input_is_fed_and_closed(self):
        handle = self.sbx.commands.run("cat", background=True, stdin=True)
        self.sbx.commands.send_stdin(handle.pid, "hello\n")
        handle.send_stdin(b"\x00bytes\n")
        handle.close_stdin()
        self.assertEqual(handle.wait().stdout, "hello\n\x00bytes\n")

    def test_a_multi_megabyte_binary_file_goes_in_and_out_whole(self):
        data = os.urandom(6 << 20)
        info = self.sbx.files.write("data/blob.bin", data)
        self.assertEqual(info.path, "/home/user/data/blob.bin")
        self.assertEqual(bytes(self.sbx.files.read("data/blob.bin", format="bytes")), data)
        inside = self.sbx.commands.run("sha256sum data/blob.bin").stdout.split()[0]
        self.assertEqual(inside, hashlib.sha256(data).hexdigest())
        self.assertFalse(self.other.files.exists("data/blob.bin"), "sandboxes share no files")

    def test_files_are_listed_made_moved_and_removed(self):
        files = self.sbx.files
        self.assertTrue(files.make_dir("tree/sub"))
        self.assertFalse(files.make_dir("tree/sub"), "it was there")
        files.write("tree/a.txt", "alpha")
        self.assertEqual(sorted(e.name for e in files.list("tree")), ["a.txt", "sub"])
        self.assertEqual(files.get_info("tree/a.txt").size, 5)
        files.rename("tree/a.txt", "tree/sub/b.txt")
        self.assertFalse(files.exists("tree/a.txt"))
        self.assertEqual(files.read("tree/sub/b.txt"), "alpha")
        files.remove("tree")
        self.assertFalse(files.exists("tree/sub/b.txt"))
        with self.assertRaises(NotFoundException):
            files.read("tree/sub/b.txt")

    def test_a_watched_directory_tells_what_changed(self):
        self.sbx.files.make_dir("watched")
        self.sbx.files.write("watched/x.txt", "1")
        handle = self.sbx.files.watch_dir("watched", recursive=True)
        self.sbx.files.write("watched/x.txt", "2")
        self.sbx.files.make_dir("watched/sub")
        self.sbx.files.write("watched/sub/y.txt", "3")
        # As E2B's: a file is written where it is, and the changes are there to take as soon
        # as the calls that made them returned, a new directory's included.
        events = [(e.type.value, e.name) for e in handle.get_new_events()]
        self.assertIn(("write", "x.txt"), events)
        self.assertIn(("create", "sub"), events)
        self.assertIn(("write", "sub/y.txt"), events)
        self.assertFalse([name for _, name in events if ".agentos" in name], events)
        handle.stop()

    def test_a_directory_watched_as_a_stream_tells_what_changed(self):
        # The asynchronous SDK watches through the streamed WatchDir (the synchronous one polls a
        # watcher): it decodes each message as E2B's WatchDirResponse.
        async def watch():
            sbx = await AsyncSandbox.connect(self.sbx.sandbox_id)
            await sbx.files.make_dir("streamed")
            seen = asyncio.Queue()
            handle = await sbx.files.watch_dir("streamed", on_event=seen.put_nowait)
            await sbx.files.write("streamed/y.txt", "2")
            names = []
            while "y.txt" not in names:
                names.append((await asyncio.wait_for(seen.get(), 20)).name)
            await handle.stop()

        asyncio.run(watch())

    def test_sandboxes_are_inspected_and_listed_by_metadata(self):
        info = self.sbx.get_info()
        self.assertEqual((info.metadata["role"], info.state.value), ("main", "running"))
        found = Sandbox.list(query=SandboxQuery(metadata={"run": RUN})).next_items()
        self.assertEqual({s.sandbox_id for s in found}, {self.sbx.sandbox_id, self.other.sandbox_id})
        mine = Sandbox.list(query=SandboxQuery(metadata={"run": RUN, "role": "other"})).next_items()
        self.assertEqual([s.sandbox_id for s in mine], [self.other.sandbox_id])
        self.assertTrue(Sandbox.connect(self.sbx.sandbox_id).is_running())
        metrics = self.sbx.get_metrics()
        self.assertEqual(len(metrics), 1)
        self.assertGreater(metrics[0].mem_total, metrics[0].mem_used)
        self.assertGreater(metrics[0].mem_used, 0)


class Lifetimes(unittest.TestCase):
    def sandbox(self, role):
        """A sandbox of this test's, killed when the test ends however it ends, so that a failed
        test leaves no sandbox behind for the listings of the others."""
        sandbox = Sandbox.create(metadata={"run": RUN, "role": role})
        self.addCleanup(Sandbox.kill, sandbox.sandbox_id)
        return sandbox

    def test_a_sandbox_ends_when_its_time_is_up(self):
        sandbox = self.sandbox("short")
        sandbox.set_timeout(3)
        wait_for("the sandbox to time out", lambda: not sandbox.is_running())
        with self.assertRaises(SandboxException):
            Sandbox.get_info(sandbox.sandbox_id)

    def test_a_paused_sandbox_keeps_its_state_and_runs_again_when_connected(self):
        sandbox = self.sandbox("paused")
        sandbox.files.write("kept.txt", "still here")
        self.assertTrue(sandbox.pause())
        self.assertFalse(sandbox.pause(), "it was paused already")
        self.assertEqual(Sandbox.get_info(sandbox.sandbox_id).state.value, "paused")
        self.assertFalse(sandbox.is_running())
        resumed = Sandbox.connect(sandbox.sandbox_id)
        self.assertEqual(resumed.files.read("kept.txt"), "still here")
        self.assertEqual(resumed.commands.run("echo up").stdout, "up\n")
        resumed.kill()

    def test_a_killed_sandbox_is_gone(self):
        sandbox = self.sandbox("killed")
        running = sandbox.commands.run("sleep 60", background=True)
        self.assertTrue(sandbox.kill())
        # The command's stream ends as unavailable; the SDK asks /health and learns why.
        with self.assertRaises(TimeoutException) as waited:
            running.wait()
        self.assertIn("killed or reached its end of life", str(waited.exception))
        self.assertFalse(Sandbox.kill(sandbox.sandbox_id), "it was gone already")
        self.assertFalse(sandbox.is_running())

    def test_a_wrong_key_and_an_unknown_sandbox_are_refused(self):
        with self.assertRaises(AuthenticationException):
            Sandbox.list(api_key="not-the-key").next_items()
        with self.assertRaises(SandboxException):
            Sandbox.connect("nosuchsandbox0000000")


if __name__ == "__main__":
    unittest.main(verbosity=2)
