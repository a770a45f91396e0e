// The JS check of kiln serve (tests/tests/serve_e2b.rs runs it with node): the unmodified
// `e2b` npm SDK creates a sandbox, runs commands, writes and reads a file, and kills it.
// E2B_API_URL, E2B_SANDBOX_URL and E2B_API_KEY point it at the server; NODE_PATH at the
// package (xtask/src/e2b.rs installs it).
const assert = require('node:assert/strict')
const { Sandbox, CommandExitError } = require('e2b')

async function main() {
  const sbx = await Sandbox.create({ timeoutMs: 600_000, requestTimeoutMs: 240_000 })
  try {
    const r = await sbx.commands.run('echo hello; echo oops >&2; whoami')
    assert.equal(r.exitCode, 0)
    assert.equal(r.stdout, 'hello\nuser\n')
    assert.equal(r.stderr, 'oops\n')
    await assert.rejects(sbx.commands.run('echo bad >&2; exit 3'), (e) => {
      assert.ok(e instanceof CommandExitError, String(e))
      assert.equal(e.exitCode, 3)
      assert.match(e.stderr, /bad/)
      return true
    })
    await sbx.files.write('/tmp/js.txt', 'from node\n')
    assert.equal(await sbx.files.read('/tmp/js.txt'), 'from node\n')
    assert.equal((await sbx.commands.run('cat /tmp/js.txt')).stdout, 'from node\n')
    assert.ok(await sbx.isRunning())
  } finally {
    await sbx.kill()
  }
  assert.equal(await sbx.isRunning(), false)
  console.log('js check ok')
}

main().catch((e) => {
  console.error(e)
  process.exit(1)
})
