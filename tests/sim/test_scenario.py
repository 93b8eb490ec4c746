import pytest

from sim import scenario as S


def write(tmp_path, text):
    p = tmp_path / "s.toml"
    p.write_text(text)
    return p


def test_empty_file_is_the_default_scenario(tmp_path):
    scn = S.load(write(tmp_path, ""))
    assert scn.federation.nodes == 32 and scn.federation.preset == "small"
    assert scn.name == "s"


def test_values_are_read_and_ints_accepted_for_floats(tmp_path):
    scn = S.load(write(tmp_path, '[federation]\nnodes = 4\npreset = "tiny"\n[network]\negress_mbps = 10\n'
                                 '[network.profiles.slow]\ndown_mbps = 1\n'))
    assert scn.federation.nodes == 4 and scn.network.egress_mbps == 10.0
    assert scn.network.profiles == {"slow": {"down_mbps": 1}}


@pytest.mark.parametrize("text, key", [
    ("[federation]\nnodes = 0\n", "federation.nodes"),
    ("[federation]\nnodes = \"many\"\n", "federation.nodes"),
    ("[federation]\nnodez = 3\n", "federation.nodez"),
    ("[workload]\ngenerate_tokens = 0\n", "workload.generate_tokens"),
    ("[workload]\nmixture_modes = [\"median\"]\n", "workload.mixture_modes"),
    ("[prefetch]\nbudgets = [2, 17]\n", "prefetch.budgets"),
    ("[prefetch]\nmiss_policy = \"panic\"\n", "prefetch.miss_policy"),
    ("[network.links]\n\"a-b\" = \"fibre\"\n", "network.links.a-b"),
    ("[faults]\nkill_nodes = 40\n", "faults.kill_nodes"),
    ("[federation]\nuse_gpu = true\n", "federation.use_gpu"),
    ("[nonsense]\nx = 1\n", "nonsense"),
    ("[federation]\nseed = true\n", "federation.seed"),
    ("[model]\nbase_steps = -1\n", "model.base_steps"),
])
def test_invalid_scenarios_name_the_key_at_fault(tmp_path, text, key):
    with pytest.raises(S.ScenarioError) as err:
        S.load(write(tmp_path, text))
    assert str(err.value).startswith(key + ":")


def test_bad_toml_and_missing_file(tmp_path):
    with pytest.raises(S.ScenarioError, match="not valid TOML"):
        S.load(write(tmp_path, "[federation\n"))
    with pytest.raises(S.ScenarioError, match="no such scenario file"):
        S.load(tmp_path / "absent.toml")


def test_override_replaces_and_revalidates(tmp_path):
    scn = S.load(write(tmp_path, "[federation]\nnodes = 4\n"))
    assert S.override(scn, "federation", nodes=8, seed=None).federation.nodes == 8
    with pytest.raises(S.ScenarioError, match="federation.nodes"):
        S.override(scn, "federation", nodes=-1)


def test_the_soup_section_resolves_auto_and_refuses_what_leaves_no_base_node():
    assert S.Scenario().validate().soup.resolved_nodes(32) == 2  # `make run`: two soup nodes
    assert S.Scenario().soup.resolved_nodes(8) == 0  # auto: none in a small federation
    scn = S.from_dict({"federation": {"nodes": 6}, "model": {"specialists": ["programmer"]}, "soup": {"nodes": 4}})
    assert scn.soup.resolved_nodes(6) == 4 and scn.soup_nodes() == 4
    # auto specialists make room for soup nodes, and still leave two base nodes
    six = S.from_dict({"federation": {"nodes": 6}, "soup": {"nodes": 2}})
    assert six.specialists() == ["programmer", "novelist"] and six.soup_nodes() == 2
    assert S.Scenario().validate().specialists() == ["programmer", "novelist", "scientist", "journalist"]
    with pytest.raises(S.ScenarioError, match="soup.nodes: 5 soup and 1 specialist nodes leave no base node"):
        S.from_dict({"federation": {"nodes": 6}, "model": {"specialists": ["programmer"]}, "soup": {"nodes": 5}})
    for key, value, msg in (("nodes", -2, "soup.nodes"), ("bank_size", 0, "soup.bank_size"), ("rank", -1, "soup.rank"),
                            ("support", 6, "soup.support"), ("sample_chars", 10, "soup.sample_chars"),
                            ("colour", 1, "soup.colour: unknown key")):
        with pytest.raises(S.ScenarioError, match=msg):
            S.from_dict({"soup": {key: value}})


def test_model_base_steps_reaches_the_suite_and_its_key(tmp_path):
    from sim.run import new_suite, suite_key

    plain = S.load(write(tmp_path, "[federation]\npreset = \"tiny\"\n"))
    longer = S.load(write(tmp_path, "[federation]\npreset = \"tiny\"\n[model]\nbase_steps = 77\n"))
    assert new_suite(longer, progress=False).preset.base.steps == 77  # nothing trains: a Suite is lazy
    assert new_suite(plain, progress=False).preset.base.steps != 77
    assert suite_key(plain) != suite_key(longer)  # sweeps never share models across base lengths
