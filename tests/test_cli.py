# Tests of the node program's parts, in this process: argument checks and defaults,
# testnet files, data-dir files, Prometheus rendering, member-event lines, and the control
# API (with a real p2p node behind it, served on 127.0.0.1, requests through httpx).
import json
import logging
import re
from pathlib import Path

import pytest
import trio
from api_helpers import served
from hypothesis import given, settings
from hypothesis import strategies as st

from p2p import Member, MemberEvent, MemberState, Network
from tasknet_node import cli, datadir, tables, testnets
from tasknet_node.api import ControlApi, Metric, render_prometheus
from tasknet_node.http import JSONResponse, Request, Response
from tasknet_node.options import build_options, parse_host_port
from tasknet_node.runner import describe_member_event
from tasknet_node.testnets import TESTNETS_DIR, load_testnet

from p2p_helpers import node_config

PEER = "12D3KooWJATHf3siFtiEXFjVaZiiUL9GTFWYiVSPzXwF3bDfoYWf"
BOOT_ADDR = f"/ip4/127.0.0.1/tcp/4101/p2p/{PEER}"


def options_for(*argv: str):
    return build_options(cli.run_parser().parse_args(list(argv)))


def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# -- arguments ---------------------------------------------------------------------------
def test_defaults_depend_on_the_role():
    boot = options_for("--bootstrap")
    assert boot.network.listen == ["/ip4/127.0.0.1/tcp/4001"]
    assert boot.network.bootstrap == []
    assert boot.network.data_dir == Path("data/node")
    assert boot.network.network_id == "tasknet-local"
    assert (boot.api_host, boot.api_port) == ("127.0.0.1", 0)

    member = options_for("--join", BOOT_ADDR, "--network", "other", "--api", "127.0.0.1:8080",
                         "--suspect-after", "1", "--dead-after", "2",
                         "--heartbeat-interval", "0.2")
    assert member.network.listen == ["/ip4/127.0.0.1/tcp/0"]
    assert member.network.bootstrap == [BOOT_ADDR]
    assert member.network.network_id == "other"
    assert (member.api_host, member.api_port) == ("127.0.0.1", 8080)
    assert (member.network.heartbeat_interval, member.network.suspect_after,
            member.network.dead_after) == (0.2, 1.0, 2.0)


def test_admission_flags_declare_the_rule():
    stake = options_for("--bootstrap", "--admission", "stake", "--min-stake", "5",
                        "--stake-task", "t", "--admission-recheck", "2.5").network.admission
    assert (stake.kind, stake.min_stake, stake.task, stake.recheck_s) == ("stake", 5, "t", 2.5)
    assert options_for("--bootstrap", "--admission", "stake", "--min-stake", "5",
                       "--stake-task", "t").network.admission.recheck_s == 30.0
    assert options_for("--bootstrap").network.admission.kind == "open"


@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1:0", ("127.0.0.1", 0)),
    ("localhost:8080", ("localhost", 8080)),
    ("[::1]:65535", ("::1", 65535)),
])
def test_api_address_parses(text, expected):
    assert parse_host_port(text) == expected


@pytest.mark.parametrize("argv, fragment", [
    (["--join", "/ip4/999.1.1.1/tcp/1/p2p/x"], "not a multiaddr"),
    (["--join", "/ip4/127.0.0.1/tcp/4001"], "/p2p/<peer-id>"),
    (["--bootstrap", "--listen", "not-an-addr"], "not a multiaddr"),
    (["--bootstrap", "--api", "127.0.0.1:70000"], "HOST:PORT"),
    (["--bootstrap", "--api", "8080"], "HOST:PORT"),
    (["--bootstrap", "--join", BOOT_ADDR], "not allowed with"),
    (["--bootstrap", "--suspect-after", "9", "--dead-after", "3"], "--suspect-after <"),
    (["--bootstrap", "--dead-after", "-1"], "must be > 0"),
    (["--bootstrap", "--network", "a/b"], "network id"),
    (["--bootstrap", "--frobnicate"], "unrecognized arguments"),
    (["--testnet", "no-such-net"], "unknown testnet 'no-such-net'"),
    (["--testnet", "../etc"], "unknown testnet"),
    ([], "nothing to join"),
    (["--bootstrap", "--no-tasks", "--admission", "stake", "--min-stake", "5",
      "--stake-task", "t"], "needs task rounds (drop --no-tasks)"),
    (["--bootstrap", "--min-stake", "5"], "--min-stake needs --admission"),
    (["--bootstrap", "--stake-task", "t", "--admission-recheck", "2"],
     "--stake-task and --admission-recheck need --admission"),
    (["--bootstrap", "--admission", "stake", "--stake-task", "t"], "min_stake"),
    (["--bootstrap", "--admission", "stake", "--min-stake", "5"], "needs the task"),
    (["--bootstrap", "--admission", "stake", "--min-stake", "5", "--stake-task", "t",
      "--admission-recheck", "0"], "must be > 0"),
])
def test_bad_arguments_give_one_line_and_exit_code_2(capsys, argv, fragment):
    code, out, err = run_main(capsys, *argv)
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("node.py: error: ")
    assert fragment in err


def test_client_command_without_a_running_node_exits_1(capsys, tmp_path):
    code, out, err = run_main(capsys, "status", "--data-dir", str(tmp_path))
    assert code == 1 and out == ""
    assert err.strip() == (f"node.py: error: no node is running with data dir {tmp_path} "
                           "(no api.json)")


def test_client_command_with_a_stale_api_file_says_the_node_exited(capsys, tmp_path):
    # a node killed with SIGKILL leaves api.json behind; pid 2**22+1 exceeds Linux's pid_max
    datadir.write_api_info(tmp_path, datadir.ApiInfo("127.0.0.1", 1, 2**22 + 1))
    code, _, err = run_main(capsys, "peers", "--data-dir", str(tmp_path))
    assert code == 1
    assert "is not running" in err and str(2**22 + 1) in err


# -- testnets ----------------------------------------------------------------------------
def write_testnet(path: Path, boot_dir: Path, network: str = "tn-test") -> Path:
    path.write_text(f'network_id = "{network}"\nbootstrap = []\n'
                    f'[bootstrap_node]\ndata_dir = "{boot_dir}"\n'
                    'listen = "/ip4/127.0.0.1/tcp/0"\n')
    return path


def test_shipped_localnet_file():
    local = load_testnet("local")
    assert local.network_id == "tasknet-localnet"
    assert local.bootstrap_node is not None
    assert local.bootstrap_node.listen == ("/ip4/127.0.0.1/tcp/4101",)
    assert local.bootstrap_node.data_dir == Path("data/localnet/bootstrap")
    assert (TESTNETS_DIR / "local.toml").is_file()


def test_testnet_bootstrap_node_and_members(tmp_path):
    boot_dir = tmp_path / "boot"
    toml = write_testnet(tmp_path / "net.toml", boot_dir)
    boot = options_for("--testnet", str(toml), "--bootstrap")
    assert boot.network.data_dir == boot_dir
    assert boot.network.listen == ["/ip4/127.0.0.1/tcp/0"]
    assert boot.network.network_id == "tn-test"
    assert boot.network.bootstrap == []

    with pytest.raises(testnets.TestnetError, match="has not run yet"):
        options_for("--testnet", str(toml))
    boot_dir.mkdir()
    datadir.write_node_info(boot_dir, PEER, "tn-test", [BOOT_ADDR])
    member = options_for("--testnet", str(toml), "--data-dir", str(tmp_path / "m"))
    assert member.network.bootstrap == [BOOT_ADDR]
    assert member.network.listen == ["/ip4/127.0.0.1/tcp/0"]
    assert member.network.data_dir == tmp_path / "m"


@pytest.mark.parametrize("content, fragment", [
    ('bootstrap = []\n', "network_id"),
    ('network_id = "x"\nbootstrap = ["/ip4/127.0.0.1/tcp/1"]\n', "/p2p/<peer-id>"),
    ('network_id = "x"\nbootstrapp = []\n', "unknown keys"),
    ('network_id = "x"\n[bootstrap_node]\ndata_dir = "d"\nlisten = "nope"\n', "not a multiaddr"),
    ('network_id = \n', "cannot read testnet file"),
    ('network_id = "x"\n[chain]\nkind = "solana"\n', "chain.kind"),
    ('network_id = "x"\n[chain]\nkind = "evm"\ncontract = "0x' + "1" * 40 + '"\n',
     "chain.url"),
    ('network_id = "x"\n[chain]\nkind = "evm"\nurl = "http://127.0.0.1:8545"\n',
     "chain.contract"),
    ('network_id = "x"\n[chain]\nurl = "http://127.0.0.1:8545"\n', 'kind = "evm"'),
])
def test_invalid_testnet_files_are_refused(tmp_path, content, fragment):
    path = tmp_path / "bad.toml"
    path.write_text(content)
    with pytest.raises(testnets.TestnetError, match=re.escape(fragment)):
        load_testnet(str(path))


def test_a_testnet_file_names_its_evm_chain_and_flags_override_it(tmp_path):
    from tasknet_node.options import build_tasks_config

    boot_dir = tmp_path / "boot"
    toml = write_testnet(tmp_path / "net.toml", boot_dir)
    contract = "0x" + "Ab" * 20
    with toml.open("a") as f:
        f.write(f'[chain]\nkind = "evm"\nurl = "http://127.0.0.1:8545"\n'
                f'contract = "{contract}"\n')
    net = load_testnet(str(toml))
    assert (net.chain.kind, net.chain.url, net.chain.contract) == (
        "evm", "http://127.0.0.1:8545", contract.lower())
    config = build_tasks_config(cli.run_parser().parse_args(
        ["--testnet", str(toml), "--bootstrap"]))
    assert (config.chain, config.chain_url, config.contract) == (
        "evm", "http://127.0.0.1:8545", contract.lower())
    config = build_tasks_config(cli.run_parser().parse_args(
        ["--testnet", str(toml), "--bootstrap", "--chain-url", "http://127.0.0.1:9"]))
    assert config.chain_url == "http://127.0.0.1:9"
    config = build_tasks_config(cli.run_parser().parse_args(
        ["--testnet", str(toml), "--bootstrap", "--chain", "ledger"]))
    assert config.chain == "ledger" and config.ledger_dir == tmp_path / "ledger"


def test_builtin_tasks_flag_names_what_a_bootstrap_creates(tmp_path):
    from tasknet_node.options import build_tasks_config

    def tasks_config(*args):
        return build_tasks_config(cli.run_parser().parse_args(
            ["--ledger", str(tmp_path / "ledger"), *args]))

    assert tasks_config("--bootstrap").builtin == ("hello", "storage")
    assert tasks_config("--bootstrap", "--builtin-tasks", " storage,hello,storage").builtin \
        == ("storage", "hello")
    for bad in ("nope", "hello,nope", ",", ""):
        with pytest.raises(cli.UsageError, match="names of built-in tasks"):
            tasks_config("--bootstrap", "--builtin-tasks", bad)
    with pytest.raises(cli.UsageError, match="for the bootstrap node"):
        tasks_config("--join", "/ip4/127.0.0.1/tcp/1", "--builtin-tasks", "hello")


def test_max_tasks_flag_limits_the_tasks_a_node_runs(tmp_path):
    from tasknet_node.options import build_tasks_config
    from tasknet_node.tasks_extension import MAX_TASKS

    def tasks_config(*args):
        return build_tasks_config(cli.run_parser().parse_args(
            ["--ledger", str(tmp_path / "ledger"), *args]))

    assert tasks_config().max_tasks == MAX_TASKS
    assert tasks_config("--max-tasks", "3").max_tasks == 3
    with pytest.raises(cli.UsageError, match="must be >= 1"):
        tasks_config("--max-tasks", "0")


def test_network_flag_must_match_the_testnet(tmp_path):
    toml = write_testnet(tmp_path / "net.toml", tmp_path / "boot")
    with pytest.raises(cli.UsageError, match="differs from testnet"):
        options_for("--testnet", str(toml), "--bootstrap", "--network", "elsewhere")


# -- data dir ----------------------------------------------------------------------------
def test_data_dir_lock_is_exclusive_and_released(tmp_path):
    datadir.prepare(tmp_path / "d")
    with datadir.locked(tmp_path / "d"):
        with pytest.raises(datadir.DataDirError, match="in use by another node"):
            with datadir.locked(tmp_path / "d"):
                pass
    with datadir.locked(tmp_path / "d"):
        pass


def test_a_file_is_not_a_data_dir(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(datadir.DataDirError, match="not a directory"):
        datadir.prepare(tmp_path / "f")


# -- progress lines ----------------------------------------------------------------------
def event(previous, current, *, restarted=False, left=False):
    member = Member(peer_id=PEER, addrs=(), incarnation=1, last_seen=0.0,
                    state=current or MemberState.DEAD, left=left)
    return MemberEvent(PEER, previous, current, member, restarted)


@pytest.mark.parametrize("ev, text", [
    (event(None, MemberState.ALIVE), "joined"),
    (event(MemberState.ALIVE, MemberState.ALIVE, restarted=True), "restarted"),
    (event(MemberState.SUSPECT, MemberState.ALIVE), "alive again"),
    (event(MemberState.ALIVE, MemberState.SUSPECT), "suspect"),
    (event(MemberState.SUSPECT, MemberState.DEAD), "dead"),
    (event(MemberState.ALIVE, MemberState.DEAD, left=True), "left"),
    (event(MemberState.DEAD, None), "forgotten"),
])
def test_member_event_lines(ev, text):
    assert describe_member_event(ev) == text


# -- Prometheus text format ---------------------------------------------------------------
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(?:,|$)')


def _unescape(text: str) -> str:
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), text)


def parse_exposition(text: str):
    """A strict reader of the format: every sample must follow its family's TYPE line."""
    types, helps, samples = {}, {}, []
    assert text.endswith("\n")
    for line in text[:-1].split("\n"):  # the format's only line separator
        if line.startswith("# HELP "):
            name, _, help_text = line[7:].partition(" ")
            assert name not in helps
            helps[name] = _unescape(help_text)
        elif line.startswith("# TYPE "):
            name, kind = line[7:].split(" ")
            assert name not in types, f"TYPE of {name} given twice"
            types[name] = kind
        else:
            match = _SAMPLE.match(line)
            assert match, f"not a sample line: {line!r}"
            name, labels, value = match.groups()
            assert name in types, f"sample of {name} before its TYPE"
            pairs = tuple((k, _unescape(v)) for k, v in _LABEL.findall(labels or ""))
            samples.append((name, pairs, float(value)))
    return types, helps, samples


metric_names = st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True).filter(
    lambda n: not n.endswith("_total"))


@st.composite
def metric_sets(draw):
    kinds = draw(st.dictionaries(metric_names, st.sampled_from(["counter", "gauge"]),
                                 min_size=1, max_size=4))
    metrics = []
    for name, kind in kinds.items():
        help_text = draw(st.text(max_size=20))
        label_sets = draw(st.lists(
            st.dictionaries(st.sampled_from(["state", "peer", "topic"]), st.text(max_size=12),
                            max_size=2),
            min_size=1, max_size=3, unique_by=lambda d: tuple(sorted(d.items()))))
        for labels in label_sets:
            value = draw(st.floats(allow_nan=False) | st.integers(-10**6, 10**6))
            metrics.append(Metric(name, value, kind, help_text, tuple(sorted(labels.items()))))
    return metrics


@settings(deadline=None, max_examples=150)
@given(metric_sets())
def test_prometheus_rendering_reads_back(metrics):
    types, helps, samples = parse_exposition(render_prometheus(metrics))

    def full(m: Metric) -> str:
        return "tasknet_" + m.name + ("_total" if m.kind == "counter" else "")

    assert types == {full(m): m.kind for m in metrics}
    assert helps == {full(m): m.help for m in metrics if m.help}
    assert samples == [(full(m), m.labels, float(m.value)) for m in metrics]


def test_prometheus_refuses_clashing_kinds_and_bad_names():
    with pytest.raises(ValueError, match="both"):
        render_prometheus([Metric("x", 1, "counter"), Metric("x_total", 2, "gauge")])
    with pytest.raises(ValueError, match="metric name"):
        render_prometheus([Metric("bad-name", 1)])
    with pytest.raises(ValueError, match="label name"):
        render_prometheus([Metric("ok", 1, labels=(("__reserved", "v"),))])


# -- control API -------------------------------------------------------------------------

async def test_control_api_endpoints_and_extensions(tmp_path):
    async with Network.start(node_config(tmp_path / "n", "api-test")) as net:
        api = ControlApi(net)
        store: dict[str, str] = {}

        async def kv(request: Request) -> Response:
            key = request.path_params["key"]
            if request.method == "PUT":
                store[key] = (await request.body()).decode()
                return JSONResponse({"stored": key})
            if key not in store:
                return JSONResponse({"error": "no such key"}, status_code=404)
            return JSONResponse({"key": key, "value": store[key]})

        api.add_route("/kv/{key:path}", kv, methods=["GET", "PUT"])
        api.add_metrics(lambda: [Metric("kv_keys", len(store), "gauge", "keys stored")])
        with pytest.raises(ValueError, match="already registered"):
            api.add_route("/kv/{key:path}", kv, methods=["PUT"])
        async with served(api) as client, net.subscribe("news") as news:
            with pytest.raises(RuntimeError, match="already serving"):
                api.add_route("/late", kv)
            status = (await client.get("/status")).json()
            assert status["peer_id"] == net.peer_id
            assert status["network"] == "api-test"
            assert status["addrs"] == net.addrs and status["addrs"][0].endswith(net.peer_id)
            assert [(m["peer_id"], m["state"]) for m in status["members"]] == [
                (net.peer_id, "alive")]

            peers = (await client.get("/peers")).json()
            assert peers == {"connected": [], "members": []}

            assert (await client.put("/kv/a/b", content=b"v1")).json() == {"stored": "a/b"}
            assert (await client.get("/kv/a/b")).json() == {"key": "a/b", "value": "v1"}
            assert (await client.get("/kv/zzz")).status_code == 404

            metrics = await client.get("/metrics")
            assert metrics.headers["content-type"].startswith("text/plain; version=0.0.4")
            types, _, samples = parse_exposition(metrics.text)
            values = {(name, labels): value for name, labels, value in samples}
            assert values[("tasknet_kv_keys", ())] == 1
            assert values[("tasknet_members", (("state", "alive"),))] == 1
            assert types["tasknet_gossip_published_total"] == "counter"
            # levels are gauges (no _total: a rate of them means nothing)
            assert types["tasknet_stranger_connections"] == "gauge"
            assert not [name for name in types if name.startswith(
                ("tasknet_stranger_connections_total", "tasknet_swim_local_health_total",
                 "tasknet_swim_pending_updates_total"))]
            assert types["tasknet_swim_local_health"] == "gauge"
            assert types["tasknet_swim_pending_updates"] == "gauge"

            # publishing: JSON only (no cross-site form posts), never the membership topic
            refused = await client.post("/publish", content=b"x",
                                        headers={"content-type": "text/plain"})
            assert refused.status_code == 415
            reserved = await client.post("/publish", json={"topic": "members", "payload": 1})
            assert reserved.status_code == 400
            assert (await client.post("/publish", json={"topic": "news"})).status_code == 400
            sent = await client.post("/publish", json={"topic": "news", "payload": {"n": 7}})
            assert sent.json() == {"published": True, "topic": "news"}
            with trio.fail_after(5):
                message = await news.next()
            assert (message.author, message.payload) == (net.peer_id, {"n": 7})

            # a page on another domain that resolves to 127.0.0.1 (DNS rebinding) is refused
            rebound = await client.get("/status", headers={"host": "evil.example:9"})
            assert rebound.status_code == 400


def test_api_info_round_trip(tmp_path):
    info = datadir.ApiInfo("::1", 8080, 1234)
    datadir.write_api_info(tmp_path, info)
    assert datadir.read_api_info(tmp_path) == info
    assert json.loads((tmp_path / "api.json").read_text())["url"] == "http://[::1]:8080"
    datadir.remove_api_info(tmp_path)
    assert not (tmp_path / "api.json").exists()


def test_libp2p_log_level_reaches_the_nodes_log():
    import libp2p.network.auto_connector  # noqa: F401  (sets its own logger's level on import)

    class Collect(logging.Handler):
        def __init__(self) -> None:
            super().__init__(logging.DEBUG)
            self.messages: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            if record.name.startswith("libp2p"):
                self.messages.append(record.getMessage())

    root = logging.getLogger()
    libp2p_root, swarm = logging.getLogger("libp2p"), logging.getLogger("libp2p.network.swarm")
    connector = logging.getLogger("libp2p.network.auto_connector")
    saved = [(lg, lg.level, lg.propagate) for lg in (root, libp2p_root, swarm, connector)]
    collect = Collect()
    root.addHandler(collect)
    try:
        cli.setup_logging("warning", "info")
        swarm.info("swarm says hello")
        swarm.debug("below the chosen level")
        assert collect.messages == ["swarm says hello"]
        collect.messages.clear()
        cli.setup_logging("warning", "critical")  # the default: py-libp2p stays quiet
        connector.info("would flood the log")
        swarm.error("an error below critical")
        assert collect.messages == []
    finally:
        root.removeHandler(collect)
        for lg, level, propagate in saved:
            lg.setLevel(level)
            lg.propagate = propagate


def test_tables_align_columns_and_show_missing_fields_as_dashes():
    answer = {"tasks": [
        {"task_id": "echo-1", "name": "echo", "round": 12, "window": "submission",
         "my_stake": 100, "pool": 5000, "running": True,
         "last_submission": {"round": 12, "value": "x"},
         "last_audit": {"round": 11, "audited": 3, "valid": 2}, "rewards_claimed": 40,
         "claimable": 25},
        {"task_id": "t2", "name": "sum", "round": None, "window": "not started",
         "my_stake": 0, "pool": 7, "running": False, "not_run": "no code installed"},
    ]}
    lines = tables.render_tasks(answer).splitlines()
    assert lines[0].split() == ["TASK", "NAME", "ROUND", "WINDOW", "MY", "STAKE", "POOL",
                                "SUBMITTED", "AUDITED", "REWARDS", "CLAIMABLE", "RUNNING"]
    # every column starts where its header does; numbers are right-aligned under it
    assert lines[1].index("echo ") == lines[2].index("sum ") == lines[0].index("NAME")
    assert lines[1].index("submission") == lines[0].index("WINDOW")
    assert lines[1][:lines[0].index("POOL") + 4].endswith("5000")
    assert lines[1][:lines[0].index("CLAIMABLE") + 9].endswith(" 25")
    assert lines[2][:lines[0].index("POOL") + 4].endswith("   7")
    assert "round 11: 2/3 valid" in lines[1] and lines[2].endswith("no: no code installed")
    assert lines[2].split()[2] == "-"  # no round yet
    assert tables.render_tasks({"tasks": []}) == "no tasks on the chain"
    # a status without the store's or the chain's sections still renders
    text = tables.render_status({"peer_id": "12D3KooWX", "members": []})
    assert text.splitlines()[0].split() == ["peer", "id", "12D3KooWX"]
    assert "kv" not in text and "\nnetwork      -\n" in text


def test_table_commands_take_json(capsys):
    for command in cli.TABLES:
        args = cli.client_parser(command).parse_args(["--json"])
        assert args.json is True
        assert cli.client_parser(command).parse_args([]).json is False
