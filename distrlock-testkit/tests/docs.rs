//! One source of truth for the case list: the `conformance_tests!` macro holds
//! it ([`CASES`] is the same list as data), and this test checks the README's
//! table and counts, RELIABILITY.md's count, and each case's documentation
//! against it.

use distrlock_testkit::{CASES, Capability};

const README: &str = include_str!("../README.md");
const CASES_RS: &str = include_str!("../src/cases.rs");
const RELIABILITY: &str = include_str!("../../RELIABILITY.md");

/// The README table's rows: (item, case, needs).
fn readme_rows() -> Vec<(u8, String, Vec<String>)> {
    README
        .lines()
        .filter(|line| line.starts_with("| ") && line.contains(" | `"))
        .filter_map(|line| {
            let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
            let item: u8 = cells.first()?.split(' ').next()?.parse().ok()?;
            let name = cells.get(1)?.trim_matches('`').to_owned();
            let needs = cells
                .get(2)?
                .split(',')
                .map(|n| n.trim().trim_matches('`').to_owned())
                .filter(|n| !n.is_empty())
                .collect();
            Some((item, name, needs))
        })
        .collect()
}

#[test]
fn the_readme_table_is_the_case_list() {
    let rows = readme_rows();
    let expected: Vec<(u8, String, Vec<String>)> = CASES
        .iter()
        .map(|case| {
            let needs = case.needs.iter().map(|c| c.name().to_owned()).collect();
            (case.item, case.name.to_owned(), needs)
        })
        .collect();
    assert_eq!(
        rows, expected,
        "the README's table must list the cases of conformance_tests!, in order, with their \
         contract items and capabilities"
    );
}

#[test]
fn the_counts_are_the_real_ones() {
    let total = CASES.len();
    assert!(
        README.contains(&format!("**{total} cases.**")),
        "the testkit README must say **{total} cases.**"
    );
    assert!(
        RELIABILITY.contains(&format!("(`distrlock-testkit`, {total} cases)")),
        "RELIABILITY.md must say (`distrlock-testkit`, {total} cases)"
    );
    let needing = CASES.iter().filter(|case| !case.needs.is_empty()).count();
    assert!(
        README.contains(&format!("the {needing} cases that need a capability")),
        "the README must say how many cases need a capability ({needing})"
    );
    // What tests/memory_conformance.rs declares.
    let memory = distrlock_testkit::Capabilities::none()
        .with(Capability::Unreachable)
        .with(Capability::ReleaseNotifications)
        .with(Capability::FairOrder);
    let run = CASES
        .iter()
        .filter(|case| memory.missing(case.needs).is_empty())
        .count();
    assert!(
        README.contains(&format!("{run} run\nand {} ignored", total - run)),
        "the README must say how many cases the memory backend runs ({run})"
    );
}

#[test]
fn each_case_documents_the_contract_item_it_proves() {
    let mut documented = Vec::new();
    let lines: Vec<&str> = CASES_RS.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        let Some(rest) = line.strip_prefix("pub async fn ") else {
            continue;
        };
        let name = rest.split('(').next().unwrap();
        assert!(
            rest.contains("(setup: &Setup)"),
            "{name} must keep the signature `pub async fn {name}(setup: &Setup)`"
        );
        // The first line of the doc comment above the function.
        let mut first = i;
        while first > 0 && lines[first - 1].starts_with("///") {
            first -= 1;
        }
        let case = CASES
            .iter()
            .find(|case| case.name == name)
            .unwrap_or_else(|| panic!("cases.rs has {name}, which conformance_tests! lacks"));
        let want = format!("/// Contract item {} (", case.item);
        assert!(
            lines[first].starts_with(&want),
            "the doc of {name} must start with `{want}…`, got `{}`",
            lines[first]
        );
        documented.push(name);
    }
    assert_eq!(
        documented.len(),
        CASES.len(),
        "every case in CASES is a `pub async fn` of cases.rs"
    );
}
