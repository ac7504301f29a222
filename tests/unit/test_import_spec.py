"""``package.module:name`` settings: the object named, or an error that starts with the setting."""
import json
import os.path

import pytest

from areal_py.import_spec import load_callable, load_object, split_spec


def test_names_resolve_to_the_module_attribute():
    assert load_object("os.path:sep", "x") == os.path.sep
    assert load_callable("json:dumps", "x") is json.dumps
    assert split_spec("a.b:c", "x") == ("a.b", "c")


@pytest.mark.parametrize("spec", ["json", ":dumps", "json:", "", None, 3])
def test_bad_form_names_the_setting(spec):
    with pytest.raises(ValueError, match=r"^tools\.custom\.t=.*: expected 'package\.module:function'$"):
        split_spec(spec, f"tools.custom.t={spec!r}")


def test_import_errors_name_the_setting():
    with pytest.raises(ValueError, match=r"^rollout\.agent='no_such_mod_x:f' cannot be imported: .*no_such_mod_x.*"
                                         r"PYTHONPATH"):
        load_callable("no_such_mod_x:f", "rollout.agent='no_such_mod_x:f'")
    with pytest.raises(ValueError, match=r"^r cannot be imported: .*nope"):
        load_object("json:nope", "r")
    with pytest.raises(ValueError, match=r"^r is not callable$"):
        load_callable("os.path:sep", "r")
    with pytest.raises(ValueError, match=r"^w: expected one of \['a'\]$"):
        load_object("w", "w", "one of ['a']")
