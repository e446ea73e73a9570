#!/usr/bin/env python3
"""Tests of tools/check-layers on fake trees: `python3 tools/check_layers_test.py` (run by .ci/run)."""
import importlib.machinery
import importlib.util
import os
import tempfile
import textwrap
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
_loader = importlib.machinery.SourceFileLoader("check_layers", os.path.join(HERE, "check-layers"))
_spec = importlib.util.spec_from_loader("check_layers", _loader)
cl = importlib.util.module_from_spec(_spec)
_loader.exec_module(cl)

TABLE = """\
# Architecture

<!-- layers: begin -->
| layer | may import | may not use | what |
|---|---|---|---|
| `src/names.rs` | — | `tokio` | names |
| `src/core/` | `names` | `tokio`, `zbus`, `std::fs`, `std::process` | core |
| `src/io/` | `core`, `names` | `zbus` | io |
| `src/engine.rs` | `core`, `io`, `names` | `zbus` | engine |
| `src/grpc/` | `engine` | — | grpc |
| `src/main.rs` | `*` | — | bin |

| exception: module | may also import | why |
|---|---|---|
EXCEPTIONS
<!-- layers: end -->
"""

CLEAN = {
    "lib.rs": "pub mod core; pub mod engine; pub mod io; pub mod names;\n",
    "main.rs": "use kata::engine; use tokio; fn main() {}\n",
    "names.rs": "pub const N: &str = \"tokio::spawn\";\n",
    "core/mod.rs": "pub mod plan;\n// tokio::spawn in a comment is no import\n",
    "core/plan.rs": "use std::collections::HashMap;\nuse super::Thing;\nuse crate::names::N;\n",
    "io/mod.rs": "use crate::{core::plan, names};\nuse std::fs;\n",
    "engine.rs": "use crate::io; use crate::core::plan::X;\nfn f() { tokio::spawn(async {}); }\n",
    "engine/timer.rs": "use super::super::io::Y;\n",
}


class Tree:
    def __init__(self, files, exceptions=""):
        self.dir = tempfile.TemporaryDirectory()
        root = self.dir.name
        with open(os.path.join(root, "ARCHITECTURE.md"), "w") as f:
            f.write(TABLE.replace("EXCEPTIONS\n", exceptions))
        for rel, text in files.items():
            p = os.path.join(root, "src", rel)
            os.makedirs(os.path.dirname(p), exist_ok=True)
            with open(p, "w") as f:
                f.write(textwrap.dedent(text))

    def check(self):
        return cl.check(self.dir.name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.dir.cleanup()


def with_file(rel, text, **more):
    files = dict(CLEAN)
    files[rel] = text
    files.update(more)
    return files


class CheckLayers(unittest.TestCase):
    def test_a_tree_within_its_rows_passes(self):
        with Tree(CLEAN) as t:
            self.assertEqual(t.check(), [])

    def test_use_tokio_in_core_fails_naming_file_and_line(self):
        with Tree(with_file("core/plan.rs", "use std::fmt;\nuse tokio;\n")) as t:
            self.assertEqual(t.check(), ["src/core/plan.rs:2: layer `core` may not use `tokio` (`tokio`)"])

    def test_an_inline_std_fs_path_in_core_fails(self):
        with Tree(with_file("core/plan.rs", "fn f() {\n    let _ = std::fs::read(\"x\");\n}\n")) as t:
            self.assertEqual(t.check(), ["src/core/plan.rs:2: layer `core` may not use `std::fs` (`std::fs::read`)"])

    def test_a_use_tree_is_expanded(self):
        with Tree(with_file("core/plan.rs", "use std::{\n    fmt,\n    process::{Command as C, exit},\n};\n")) as t:
            got = t.check()
        self.assertEqual(len(got), 2, got)
        self.assertTrue(all(g.startswith("src/core/plan.rs:1: layer `core` may not use `std::process`") for g in got), got)

    def test_comments_strings_and_test_items_are_left_out(self):
        text = """\
            //! uses tokio::spawn in prose
            /* use tokio; */
            const S: &str = "use tokio;";
            const R: &str = r#"std::fs::read"#;
            fn f<'a>(x: &'a str) -> char { 'a' }
            #[cfg(test)]
            mod tests {
                use tokio;
                fn g() { std::fs::read("x"); }
            }
            #[cfg(test)]
            use std::fs;
            """
        with Tree(with_file("core/plan.rs", text)) as t:
            self.assertEqual(t.check(), [])

    def test_code_after_a_test_module_is_still_checked(self):
        text = "#[cfg(test)]\nmod tests { use tokio; }\nuse zbus::Connection;\n"
        with Tree(with_file("core/plan.rs", text)) as t:
            self.assertEqual(t.check(), ["src/core/plan.rs:3: layer `core` may not use `zbus` (`zbus::Connection`)"])

    def test_an_arrow_running_back_up_fails(self):
        with Tree(with_file("core/plan.rs", "use crate::engine::Handle;\nuse super::super::io::Y;\n")) as t:
            got = t.check()
        self.assertEqual(len(got), 2, got)
        self.assertTrue(got[0].startswith("src/core/plan.rs:1: layer `core` may not import `engine::Handle`"), got)
        self.assertTrue(got[1].startswith("src/core/plan.rs:2: layer `core` may not import `io::Y`"), got)

    def test_a_grouped_crate_import_fails_for_its_forbidden_leaf_alone(self):
        with Tree(with_file("io/mod.rs", "use crate::{core::plan, engine::Handle};\n")) as t:
            got = t.check()
        self.assertEqual(len(got), 1, got)
        self.assertIn("layer `io` may not import `engine::Handle`", got[0])

    def test_a_row_covers_a_file_turned_into_a_folder(self):
        with Tree(with_file("engine/mod.rs", "use crate::io;\n")) as t:
            self.assertEqual(t.check(), [])

    def test_an_exception_row_allows_its_one_import(self):
        files = with_file("grpc/kick.rs", "use crate::io::Error;\nuse crate::core::X;\n")
        exc = "| `grpc::kick` | `io::Error` | until issue 29 moves it |\n"
        with Tree(files, exc) as t:
            got = t.check()
        self.assertEqual(len(got), 1, got)
        self.assertIn("may not import `core::X`", got[0])

    def test_an_exception_naming_no_issue_is_refused(self):
        exc = "| `grpc::kick` | `io::Error` | for now |\n"
        with Tree(CLEAN, exc) as t:
            with self.assertRaises(cl.TableError):
                t.check()

    def test_a_row_importing_a_later_row_is_refused(self):
        files = dict(CLEAN)
        with Tree(files) as t:
            path = os.path.join(t.dir.name, "ARCHITECTURE.md")
            text = cl.read(path).replace("| `src/io/` | `core`, `names`", "| `src/io/` | `core`, `engine`")
            with open(path, "w") as f:
                f.write(text)
            with self.assertRaises(cl.TableError):
                t.check()

    def test_a_file_in_no_row_fails(self):
        with Tree(with_file("startup/cli.rs", "fn f() {}\n")) as t:
            self.assertEqual(t.check(), ["src/startup/cli.rs:1: module `startup::cli` falls in no row of ARCHITECTURE.md's layer table"])

    def test_the_repository_itself_passes(self):
        self.assertEqual(cl.check(os.path.join(HERE, "..")), [])


if __name__ == "__main__":
    unittest.main()
