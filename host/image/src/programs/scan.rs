//! Finds the programs the workspace starts on the host: `Command::new` with a literal (or a
//! `const` string) in Rust, the commands of the shell scripts in `scripts/` and `.ci/`, and
//! `subprocess` calls with a literal program in Python. Guest code (`guest-agent`, `guest-infer`,
//! `eval/`) runs programs of the guest image and is not scanned.

use std::path::{Path, PathBuf};

/// A program named somewhere, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Started {
    pub program: String,
    /// `path:line`.
    pub at: String,
}

/// Top-level directories whose code runs in guests, or that hold no source of ours.
const NOT_HOST: [&str; 6] = [
    "target",
    ".git",
    "guest-agent",
    "guest-infer",
    "eval",
    "corpus",
];

/// This scanner's own tests name programs that are not listed, on purpose.
const THIS_FILE: &str = "programs/scan.rs";

/// Every program started by the workspace at `root`.
pub fn workspace(root: &Path) -> std::io::Result<Vec<Started>> {
    let mut files = Vec::new();
    walk(root, &mut files)?;
    files.sort();
    let mut rust_sources = Vec::new();
    let mut started = Vec::new();
    for path in &files {
        let shown = path
            .strip_prefix(root)
            .unwrap_or(path)
            .display()
            .to_string();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if shown.ends_with(THIS_FILE) {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(path) else {
            continue;
        };
        let found = if name.ends_with(".rs") {
            rust_sources.push(text.clone());
            rust(&text)
        } else if name.ends_with(".py") {
            python(&text)
        } else if is_shell_script(&shown, &text) {
            shell(&text)
        } else {
            continue;
        };
        started.extend(found.into_iter().map(|(program, line)| Started {
            program,
            at: format!("{shown}:{line}"),
        }));
    }
    // `Command::new(NAME)` names a constant; find its string anywhere in the workspace.
    for s in &mut started {
        if let Some(constant) = s.program.strip_prefix("const ") {
            let value = rust_sources.iter().find_map(|src| const_str(src, constant));
            s.program = value.unwrap_or_else(|| format!("<constant {constant} not found>"));
        }
    }
    started.retain(|s| !s.program.contains('/'));
    Ok(started)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let kind = entry.file_type()?;
        if kind.is_dir() {
            if !NOT_HOST.contains(&name.as_ref()) {
                walk(&entry.path(), out)?;
            }
        } else if kind.is_file() {
            out.push(entry.path());
        }
    }
    Ok(())
}

fn is_shell_script(shown: &str, text: &str) -> bool {
    let first = text.lines().next().unwrap_or("");
    (shown.starts_with("scripts/") || shown.starts_with(".ci/"))
        && first.starts_with("#!")
        && first.contains("sh")
}

/// Calls whose first argument is a program: started, or looked up to be started.
const RUST_CALLS: [&str; 2] = ["Command::new(", "programs::find("];

/// The programs given to [`RUST_CALLS`]: a string literal's, or `const NAME` for a constant.
pub fn rust(src: &str) -> Vec<(String, usize)> {
    let mut found = Vec::new();
    let calls = RUST_CALLS.iter().flat_map(|call| {
        src.match_indices(call)
            .map(move |(start, _)| (start, start + call.len()))
    });
    for (start, arg_start) in calls {
        let line = src[..start].matches('\n').count() + 1;
        let arg = src[arg_start..].trim_start();
        if let Some(rest) = arg.strip_prefix('"') {
            if let Some(end) = rest.find('"') {
                found.push((rest[..end].to_owned(), line));
            }
        } else {
            let ident: String = arg
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':')
                .collect();
            let last = ident.rsplit("::").next().unwrap_or("");
            let is_constant = !last.is_empty()
                && last
                    .chars()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
            if is_constant && arg[ident.len()..].trim_start().starts_with(')') {
                found.push((format!("const {last}"), line));
            }
        }
    }
    found
}

/// The value of `const NAME: &str = "...";` in `src`.
fn const_str(src: &str, name: &str) -> Option<String> {
    let pattern = format!("const {name}: &str = \"");
    let start = src.find(&pattern)? + pattern.len();
    let end = src[start..].find('"')?;
    Some(src[start..start + end].to_owned())
}

/// Programs given as the first, literal element of a `subprocess` call's argument list.
pub fn python(src: &str) -> Vec<(String, usize)> {
    let mut found = Vec::new();
    for call in ["run(", "check_output(", "check_call(", "call(", "Popen("] {
        let pattern = format!("subprocess.{call}[");
        for (start, _) in src.match_indices(&pattern) {
            let line = src[..start].matches('\n').count() + 1;
            let arg = src[start + pattern.len()..].trim_start();
            let Some(quote) = arg.chars().next().filter(|c| *c == '"' || *c == '\'') else {
                continue;
            };
            if let Some(end) = arg[1..].find(quote) {
                found.push((arg[1..1 + end].to_owned(), line));
            }
        }
    }
    found
}

/// A shell token: a word (with its line) or an operator that ends a command.
#[derive(Debug, Clone, PartialEq)]
enum Token {
    Word(String, usize),
    /// `|`, `||`, `&&`, `;`, `;;`, `&`, a newline.
    Separator,
    /// `(` and `)` of a subshell, a function definition or a `case` pattern.
    Open,
    Close,
    /// A redirection: the word after it is its target, not a command.
    Redirect,
}

/// The lexer's position in a script.
struct Lexer<'a> {
    chars: Vec<char>,
    pos: usize,
    line: usize,
    /// Command substitutions and process substitutions: token lists of their own.
    nested: &'a mut Vec<Vec<Token>>,
}

impl Lexer<'_> {
    fn peek(&self, ahead: usize) -> Option<char> {
        self.chars.get(self.pos + ahead).copied()
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.chars.get(self.pos).copied()?;
        self.pos += 1;
        if c == '\n' {
            self.line += 1;
        }
        Some(c)
    }

    /// Tokens up to the end, or (inside a substitution) up to its unmatched `)`.
    fn tokens(&mut self, in_substitution: bool) -> Vec<Token> {
        let mut out = Vec::new();
        let mut depth = 0usize;
        let mut word = String::new();
        let mut word_line = self.line;
        let finish = |word: &mut String, out: &mut Vec<Token>, line: usize| {
            if !word.is_empty() {
                out.push(Token::Word(std::mem::take(word), line));
            }
        };
        while let Some(c) = self.peek(0) {
            if word.is_empty() {
                word_line = self.line;
            }
            match c {
                '\\' => {
                    self.bump();
                    if let Some(next) = self.bump()
                        && next != '\n'
                    {
                        word.push(next);
                    }
                }
                '\'' => {
                    self.bump();
                    word.push('\'');
                    while let Some(c) = self.bump() {
                        if c == '\'' {
                            break;
                        }
                    }
                }
                '"' => {
                    self.bump();
                    word.push('"');
                    self.double_quoted();
                }
                '$' if self.peek(1) == Some('(') && self.peek(2) == Some('(') => {
                    self.skip_balanced();
                    word.push_str("$((…))");
                }
                '$' if self.peek(1) == Some('(') => {
                    self.pos += 2;
                    self.substitution();
                    word.push_str("$(…)");
                }
                '`' => {
                    self.bump();
                    let start = self.pos;
                    while let Some(c) = self.bump() {
                        if c == '`' {
                            break;
                        }
                    }
                    let inner: String = self.chars[start..self.pos.saturating_sub(1)]
                        .iter()
                        .collect();
                    let tokens = shell_tokens(&inner, self.nested);
                    self.nested.push(tokens);
                    word.push_str("`…`");
                }
                '#' if word.is_empty() => {
                    while self.peek(0).is_some_and(|c| c != '\n') {
                        self.bump();
                    }
                }
                '(' if word.ends_with('=') => {
                    // An array assignment: `name=(a b c)`.
                    self.skip_balanced();
                    word.push_str("(…)");
                }
                '<' | '>' => {
                    if word.chars().all(|c| c.is_ascii_digit()) {
                        word.clear(); // a descriptor number: `2>&1`
                    }
                    finish(&mut word, &mut out, word_line);
                    if c == '<' && self.peek(1) == Some('(') {
                        self.pos += 2;
                        self.substitution();
                        out.push(Token::Word("<(…)".into(), self.line));
                        continue;
                    }
                    while self
                        .peek(0)
                        .is_some_and(|c| matches!(c, '<' | '>' | '&' | '-'))
                    {
                        self.bump();
                    }
                    out.push(Token::Redirect);
                }
                ' ' | '\t' => {
                    self.bump();
                    finish(&mut word, &mut out, word_line);
                }
                '\n' | ';' | '|' | '&' => {
                    self.bump();
                    finish(&mut word, &mut out, word_line);
                    while self.peek(0).is_some_and(|n| n == c && c != '\n') {
                        self.bump();
                    }
                    out.push(Token::Separator);
                }
                '(' => {
                    self.bump();
                    finish(&mut word, &mut out, word_line);
                    depth += 1;
                    out.push(Token::Open);
                }
                ')' => {
                    if in_substitution && depth == 0 {
                        self.bump();
                        finish(&mut word, &mut out, word_line);
                        return out;
                    }
                    self.bump();
                    finish(&mut word, &mut out, word_line);
                    depth = depth.saturating_sub(1);
                    out.push(Token::Close);
                }
                _ => {
                    self.bump();
                    word.push(c);
                }
            }
        }
        finish(&mut word, &mut out, word_line);
        out
    }

    /// After `$(` or `<(`: its commands, lexed as a list of their own.
    fn substitution(&mut self) {
        let inner = self.tokens(true);
        self.nested.push(inner);
    }

    /// After an opening `"`: up to the closing one; `$(...)` inside is lexed.
    fn double_quoted(&mut self) {
        while let Some(c) = self.peek(0) {
            match c {
                '\\' => {
                    self.bump();
                    self.bump();
                }
                '"' => {
                    self.bump();
                    return;
                }
                '$' if self.peek(1) == Some('(') && self.peek(2) == Some('(') => {
                    self.skip_balanced();
                }
                '$' if self.peek(1) == Some('(') => {
                    self.pos += 2;
                    self.substitution();
                }
                _ => {
                    self.bump();
                }
            }
        }
    }

    /// From a `$((` or `(`: past the matching `)`.
    fn skip_balanced(&mut self) {
        let mut depth = 0usize;
        while let Some(c) = self.bump() {
            match c {
                '(' => depth += 1,
                ')' => {
                    depth = depth.saturating_sub(1);
                    if depth == 0 {
                        return;
                    }
                }
                _ => {}
            }
        }
    }
}

/// Shell keywords and builtins: never programs.
const BUILTINS: &str = "! . : [ [[ ]] { } alias bg break builtin case cd continue declare do done
    echo elif else esac eval exit export false fg fi for function getopts hash if in jobs kill let
    local mapfile popd printf pushd pwd read readarray readonly return select set shift shopt
    source test then time trap true type typeset ulimit umask unset until wait while";

/// Keywords after which the next word is a command again.
const LEADS_TO_COMMAND: &str = "! { } do done elif else esac fi if then time until while";

fn is_one_of(list: &str, word: &str) -> bool {
    list.split_whitespace().any(|w| w == word)
}

/// Programs that run the command given as their arguments, with how many positional arguments
/// come before it and which of their options take a value.
const WRAPPERS: &[(&str, usize, &[&str])] = &[
    ("env", 0, &["-u", "-C"]),
    ("exec", 0, &[]),
    ("nice", 0, &["-n"]),
    ("nohup", 0, &[]),
    ("sudo", 0, &["-u", "-g"]),
    ("timeout", 1, &["-k", "--kill-after", "-s", "--signal"]),
    ("xargs", 0, &["-n", "-I", "-P", "-d"]),
];

/// A script's function that runs its arguments as a command (`as_root apt-get ...`).
const SCRIPT_WRAPPERS: &[&str] = &["as_root"];

fn shell_tokens(src: &str, nested: &mut Vec<Vec<Token>>) -> Vec<Token> {
    let mut lexer = Lexer {
        chars: src.chars().collect(),
        pos: 0,
        line: 1,
        nested,
    };
    lexer.tokens(false)
}

/// Heredoc bodies replaced by empty lines (their text is data, not commands).
fn without_heredocs(src: &str) -> String {
    let mut out = Vec::new();
    let mut until: Option<String> = None;
    for line in src.lines() {
        if let Some(end) = &until {
            if line.trim() == end {
                until = None;
            }
            out.push("");
            continue;
        }
        out.push(line);
        if let Some(at) = line.find("<<")
            && !line[at..].starts_with("<<<")
        {
            let rest = line[at + 2..].trim_start_matches('-').trim_start();
            let word: String = rest
                .trim_start_matches(['\'', '"'])
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !word.is_empty() {
                until = Some(word);
            }
        }
    }
    out.join("\n")
}

/// A word that names a program found on PATH (not a path, a variable or an option).
fn is_program_name(word: &str) -> bool {
    let mut chars = word.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '+'))
}

fn is_assignment(word: &str) -> bool {
    word.split_once('=').is_some_and(|(name, _)| {
        let name = name.trim_end_matches('+');
        !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    })
}

/// The programs a shell script runs, each with its line.
pub fn shell(src: &str) -> Vec<(String, usize)> {
    let mut nested = Vec::new();
    let main = shell_tokens(&without_heredocs(src), &mut nested);
    let mut lists = vec![main];
    // Substitutions nest; each list is scanned on its own.
    let mut i = 0;
    while i < nested.len() {
        lists.push(nested[i].clone());
        i += 1;
    }
    let functions: Vec<String> = lists
        .iter()
        .flat_map(|tokens| {
            tokens.windows(3).filter_map(|w| match w {
                [Token::Word(name, _), Token::Open, Token::Close] => Some(name.clone()),
                _ => None,
            })
        })
        .collect();
    let mut found = Vec::new();
    for tokens in &lists {
        commands(tokens, &functions, &mut found);
    }
    found
}

/// What the scan of one command list expects next.
#[derive(Clone, Copy, PartialEq)]
enum Expect {
    /// A command word.
    Command,
    /// Arguments: nothing more to find.
    Arguments,
    /// The words of a `for`/`case`/`select` header, up to the next separator.
    Header,
    /// After `command -v`: the program looked up.
    LookedUp,
    /// A wrapper's arguments: skip options (and their values) and `skip` positionals; the next
    /// word is the command.
    Wrapped { skip: usize, value_next: bool },
}

fn commands(tokens: &[Token], functions: &[String], found: &mut Vec<(String, usize)>) {
    let mut expect = Expect::Command;
    let mut redirect_target = false;
    let mut wrapper_options: &[&str] = &[];
    // The index in `found` of the current command's program, dropped again if a `)` shows the
    // word was a `case` pattern.
    let mut current: Option<usize> = None;
    let mut depth = 0usize;
    for (i, token) in tokens.iter().enumerate() {
        let word = match token {
            Token::Separator | Token::Open => {
                if *token == Token::Open {
                    depth += 1;
                }
                expect = Expect::Command;
                current = None;
                continue;
            }
            Token::Close => {
                if depth > 0 {
                    depth -= 1;
                } else if let Some(at) = current.take() {
                    found.truncate(at); // `pattern)` of a case
                }
                expect = Expect::Command;
                continue;
            }
            Token::Redirect => {
                redirect_target = true;
                continue;
            }
            Token::Word(word, line) => (word.as_str(), *line),
        };
        if std::mem::take(&mut redirect_target) {
            continue;
        }
        let (word, line) = word;
        // A function definition: `name() {`.
        if matches!(tokens.get(i + 1), Some(Token::Open))
            && matches!(tokens.get(i + 2), Some(Token::Close))
        {
            continue;
        }
        match expect {
            Expect::Arguments | Expect::Header => {}
            Expect::LookedUp if word.starts_with('-') => {}
            Expect::LookedUp => {
                if is_program_name(word) {
                    found.push((word.to_owned(), line));
                }
                expect = Expect::Arguments;
            }
            Expect::Wrapped { skip, value_next } => {
                if value_next {
                    expect = Expect::Wrapped {
                        skip,
                        value_next: false,
                    };
                } else if word.starts_with('-') {
                    expect = Expect::Wrapped {
                        skip,
                        value_next: wrapper_options.contains(&word),
                    };
                } else if is_assignment(word) {
                } else if skip > 0 {
                    expect = Expect::Wrapped {
                        skip: skip - 1,
                        value_next: false,
                    };
                } else {
                    expect = Expect::Command;
                    current = None;
                    // Scanned again as a command word.
                    command_word(word, line, functions, found, &mut expect, &mut current);
                    if let Expect::Wrapped { .. } = expect {
                        wrapper_options = wrapper_of(word).map_or(&[], |w| w.2);
                    }
                }
            }
            Expect::Command => {
                command_word(word, line, functions, found, &mut expect, &mut current);
                if let Expect::Wrapped { .. } = expect {
                    wrapper_options = wrapper_of(word).map_or(&[], |w| w.2);
                }
            }
        }
    }
}

fn wrapper_of(word: &str) -> Option<&'static (&'static str, usize, &'static [&'static str])> {
    WRAPPERS.iter().find(|w| w.0 == word)
}

fn command_word(
    word: &str,
    line: usize,
    functions: &[String],
    found: &mut Vec<(String, usize)>,
    expect: &mut Expect,
    current: &mut Option<usize>,
) {
    if is_assignment(word) {
        return;
    }
    if is_one_of(LEADS_TO_COMMAND, word) {
        return;
    }
    if matches!(word, "for" | "case" | "select") {
        *expect = Expect::Header;
        return;
    }
    if word == "command" {
        *expect = Expect::LookedUp;
        return;
    }
    *expect = Expect::Arguments;
    if SCRIPT_WRAPPERS.contains(&word) {
        *expect = Expect::Wrapped {
            skip: 0,
            value_next: false,
        };
        return;
    }
    if is_one_of(BUILTINS, word) || functions.iter().any(|f| f == word) {
        return;
    }
    if !is_program_name(word) {
        return;
    }
    *current = Some(found.len());
    found.push((word.to_owned(), line));
    if let Some((_, skip, _)) = wrapper_of(word) {
        *expect = Expect::Wrapped {
            skip: *skip,
            value_next: false,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(found: Vec<(String, usize)>) -> Vec<String> {
        found.into_iter().map(|(name, _)| name).collect()
    }

    #[test]
    fn rust_literals_and_constants_are_found() {
        let src = "let a = Command::new(\"cpio\");\nconst TOOL: &str = \"mytool\";\nCommand::new(TOOL).arg(x);\nCommand::new(&exe);\nstd::process::Command::new(qemu::QEMU)\nlet p = crate::programs::find(\"cpio\")?;\n";
        assert_eq!(
            rust(src),
            [
                ("cpio".to_owned(), 1),
                ("const TOOL".to_owned(), 3),
                ("const QEMU".to_owned(), 5),
                ("cpio".to_owned(), 6)
            ]
        );
        assert_eq!(const_str(src, "TOOL").as_deref(), Some("mytool"));
    }

    #[test]
    fn python_subprocess_literals_are_found() {
        let src = "subprocess.run([\"dpkg-query\", \"-W\"])\nsubprocess.run(cmd + [req])\n";
        assert_eq!(names(python(src)), ["dpkg-query"]);
    }

    #[test]
    fn shell_commands_are_found_in_pipes_lists_substitutions_and_wrappers() {
        let src = r#"#!/usr/bin/env bash
set -euo pipefail
cd "$(dirname "$0")/.."
usage() { echo u; }
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
x=$(cpio -t < "$f" | sort -u) && grep -q y "$z" || missing+=(pkg)
DEBIAN_FRONTEND=noninteractive as_root apt-get install -y foo
timeout --kill-after 30 "$LIMIT" "$BIN" carrier 2>&1 | tee -a "$log"
timeout 5 sleep 1
{ command -v ld >/dev/null; } || echo "$(wc -c <"$file") bytes" >&2
python3 -c 'import json
print(json.loads(x))
'
for m in $(seq 3); do echo "$m"; done
case "$placement" in
  direct)
    flock 9 ;;
  -h | --help) usage ;;
  ok) echo ok ;;
  *) exit 1 ;;
esac
cat <<'EOF'
notaprogram --here
EOF
mapfile -t names < <(tr ' ' '\n' <<< "$x")
"$venv/bin/pip" install q; target/release/agentos run
"#;
        let mut got = names(shell(src));
        got.sort();
        assert_eq!(
            got,
            [
                "apt-get", "cat", "cpio", "dirname", "flock", "grep", "id", "ld", "python3", "seq",
                "sleep", "sort", "sudo", "tee", "timeout", "timeout", "tr", "wc"
            ]
        );
    }

    #[test]
    fn shell_lines_are_counted() {
        let found = shell("echo a\n\ncpio -t\n");
        assert_eq!(found, [("cpio".to_owned(), 3)]);
    }
}
