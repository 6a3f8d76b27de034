//! Group files as a careless user writes them: any UTF-8 text to the parser. An error must name a
//! line of the file (or the line after its last), and a group it accepts must be one that runs.

#![no_main]

use agentos::group::file::{INPUT, MAX_AGENTS, OUTPUT, parse};
use agentos_protocol::peer::valid_peer_name;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match parse(text) {
        Err((line, problem)) => {
            let lines = text.lines().count();
            assert!(
                (1..=lines + 1).contains(&line),
                "error on line {line} of a {lines}-line file: {problem}"
            );
        }
        Ok(spec) => {
            assert!(valid_peer_name(&spec.name));
            assert!(!spec.agents.is_empty() && spec.agents.len() <= MAX_AGENTS);
            let entry = spec.entry();
            assert!(
                spec.agents.iter().any(|a| a.name == entry),
                "entry `{entry}` is no agent"
            );
            for agent in &spec.agents {
                assert!(
                    valid_peer_name(&agent.name) && agent.name != INPUT && agent.name != OUTPUT
                );
                assert!(agent.vm.vcpus() >= 1);
                spec.outputs_of(&agent.name);
            }
            spec.results_per_input();
        }
    }
});
