//! The Argo CD health check documented in README.md, run by a real Lua 5.1 interpreter (mlua,
//! Lua built from source) the way Argo CD runs it, so tests can assert what Argo CD would show
//! for an AgentConfig.
//!
//! How Argo CD runs a health script (argoproj/argo-cd `util/lua/lua.go`, `VM.runLua` and
//! `VM.ExecuteHealthLua`), and what is mirrored here:
//! - a fresh gopher-lua (Lua 5.1) state per call, with only the base, `package` and `table`
//!   libraries (plus a safe subset of `os`, left out here) unless the override sets
//!   `useOpenLibs`; so a script must not use `string`, `math` or `io`, and here it cannot either
//!   (Lua 5.1's base library also brings `coroutine`, which gopher-lua keeps apart);
//! - the object (the whole resource, as `kubectl get -o json` gives it) is the global `obj`,
//!   converted by `decodeValue`: maps are tables with string keys, arrays are 1-based sequences
//!   built with `LTable.Append` (which skips nil, so a JSON null in an array is dropped), every
//!   number is a Lua number (a float), JSON null is nil;
//! - the chunk is run (`DoString`) under a 1 s deadline; its return value must be a table, else
//!   the error is `expect table output from Lua script, not <type>`; the table is encoded to
//!   JSON and read as `{status, message}`; a status that is not one of `Healthy`, `Progressing`,
//!   `Degraded`, `Suspended`, `Missing`, `Unknown` becomes `Unknown` with the message
//!   `Lua returned an invalid health status`.
//!
//! Bounds here instead of the 1 s deadline (so a run does not depend on the machine's load): at
//! most [`MAX_INSTRUCTIONS`] Lua instructions and [`MAX_MEMORY`] bytes per run; beyond either
//! the run fails with a message that says which.
use std::cell::Cell;
use std::rc::Rc;

use mlua::{HookTriggers, Lua, LuaOptions, LuaSerdeExt, StdLib, Value, VmState};
use serde_json::Value as Json;

/// The first line of the README's health script block: the `argocd-cm` key it goes under.
pub const HEADER: &str = "-- argocd-cm: resource.customizations.health.opamp.dev_AgentConfig";

/// Lua instructions one run may execute (a few hundred suffice for the README's script).
pub const MAX_INSTRUCTIONS: u64 = 10_000_000;

/// Bytes the Lua state of one run may allocate.
pub const MAX_MEMORY: usize = 64 << 20;

/// What Argo CD shows for a resource: its health status and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    /// `Healthy`, `Progressing`, `Degraded`, `Suspended`, `Missing` or `Unknown`.
    pub status: String,
    /// The script's message (empty when it set none).
    pub message: String,
}

/// Argo CD's health status codes (gitops-engine `health.HealthStatusCode`).
const STATUSES: &[&str] = &["Healthy", "Progressing", "Degraded", "Suspended", "Missing", "Unknown"];

/// The health script of README.md: the ```` ```lua ```` block whose first line is [`HEADER`],
/// without the fences. Panics, saying so, if README.md has no such block.
pub fn script() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/README.md");
    let readme = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
    extract(&readme).unwrap_or_else(|| {
        panic!("README.md has no ```lua block starting with the line `{HEADER}` (the Argo CD health check)")
    })
}

/// The ```` ```lua ```` block of `markdown` whose first line is [`HEADER`], if any.
pub fn extract(markdown: &str) -> Option<String> {
    let mut lines = markdown.lines();
    while let Some(line) = lines.next() {
        if line.trim_end() != "```lua" {
            continue;
        }
        let block: Vec<&str> = lines.by_ref().take_while(|l| l.trim_end() != "```").collect();
        if block.first().map(|l| l.trim_end()) == Some(HEADER) {
            return Some(block.join("\n") + "\n");
        }
    }
    None
}

/// What Argo CD shows for `object` (a whole AgentConfig as `kubectl get -o json` gives it, or
/// `serde_json::to_value` of an `AgentConfig` read with kube) with the README's health script.
/// Panics with Lua's message if the script fails.
pub fn health(object: &Json) -> Health {
    health_with(&script(), object)
}

/// [`health`] with another script. Panics with Lua's message if the script fails.
pub fn health_with(script: &str, object: &Json) -> Health {
    run(script, object).unwrap_or_else(|e| panic!("the Argo CD health script failed: {e}"))
}

/// Runs a health script against `object` as Argo CD does (see the module docs); `Err` holds
/// Lua's message or why the result is not a health status.
pub fn run(script: &str, object: &Json) -> Result<Health, String> {
    let lua =
        Lua::new_with(StdLib::TABLE | StdLib::PACKAGE, LuaOptions::default()).map_err(|e| e.to_string())?;
    lua.set_memory_limit(MAX_MEMORY).map_err(|e| e.to_string())?;
    const EVERY: u32 = 1000;
    let count = Rc::new(Cell::new(0u64));
    lua.set_hook(HookTriggers::new().every_nth_instruction(EVERY), move |_, _| {
        count.set(count.get() + u64::from(EVERY));
        if count.get() > MAX_INSTRUCTIONS {
            return Err(mlua::Error::runtime(format!(
                "the script ran more than {MAX_INSTRUCTIONS} Lua instructions"
            )));
        }
        Ok(VmState::Continue)
    })
    .map_err(|e| e.to_string())?;
    let obj = decode_value(&lua, object).map_err(|e| e.to_string())?;
    lua.globals().set("obj", obj).map_err(|e| e.to_string())?;
    let returned: Value = lua.load(script).set_name("=health.lua").call(()).map_err(|e| lua_message(&e))?;
    let Value::Table(_) = returned else {
        return Err(format!("expect table output from Lua script, not {}", returned.type_name()));
    };
    let json: Json = lua.from_value(returned).map_err(|e| e.to_string())?;
    let field = |name: &str| match json.get(name) {
        None | Some(Json::Null) => Ok(String::new()),
        Some(Json::String(s)) => Ok(s.clone()),
        Some(other) => Err(format!("the script's {name} is not a string: {other}")),
    };
    let (status, message) = (field("status")?, field("message")?);
    if !STATUSES.contains(&status.as_str()) {
        return Ok(Health {
            status: "Unknown".into(),
            message: "Lua returned an invalid health status".into(),
        });
    }
    Ok(Health { status, message })
}

/// Argo CD's `decodeValue`: JSON to a Lua value (see the module docs).
fn decode_value(lua: &Lua, value: &Json) -> mlua::Result<Value> {
    Ok(match value {
        Json::Null => Value::Nil,
        Json::Bool(b) => Value::Boolean(*b),
        Json::Number(n) => Value::Number(n.as_f64().unwrap_or(f64::NAN)),
        Json::String(s) => Value::String(lua.create_string(s)?),
        Json::Array(items) => {
            let table = lua.create_table_with_capacity(items.len(), 0)?;
            for item in items.iter().filter(|i| !i.is_null()) {
                table.raw_push(decode_value(lua, item)?)?;
            }
            Value::Table(table)
        }
        Json::Object(map) => {
            let table = lua.create_table_with_capacity(0, map.len())?;
            for (key, item) in map {
                table.raw_set(key.as_str(), decode_value(lua, item)?)?;
            }
            Value::Table(table)
        }
    })
}

/// Lua's own message for a failed run, without the stack traceback; for the memory bound, which
/// bound.
fn lua_message(e: &mlua::Error) -> String {
    match e {
        mlua::Error::CallbackError { cause, .. } => lua_message(cause),
        mlua::Error::MemoryError(m) => {
            format!("the script used more than {MAX_MEMORY} bytes of memory ({m})")
        }
        mlua::Error::RuntimeError(m) | mlua::Error::SyntaxError { message: m, .. } => {
            m.split("\nstack traceback:").next().unwrap_or(m).to_owned()
        }
        other => other.to_string(),
    }
}
