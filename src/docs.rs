//! `shiftd generate-docs --out DIR [--date YYYY-MM-DD]`: the man pages and the shell completions, made
//! from the command line's own definition (clap), so that they cannot drift from it.
//! `packaging/build.sh` runs it with the tested binary. It is no subcommand of the parser: `--help`,
//! the man pages and the completions do not offer it.
//!
//! Writes `DIR/shiftd.8` (every command with its options, and the hand-written sections below),
//! `DIR/shiftd-COMMAND.8` for each command, and `DIR/completions/{shiftd.bash,_shiftd,shiftd.fish}`.

use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Arg, Command};
use clap_complete::Shell;
use clap_mangen::Man;

/// The first argument that selects this command.
pub const COMMAND: &str = "generate-docs";

/// The manual section of shiftd's command pages: a daemon and its tools.
const SECTION: &str = "8";

/// What the command line's definition does not say: the page's closing sections, in roff.
const EXTRA_SECTIONS: &str = r#".SH ENVIRONMENT
The unit reads
.I /etc/default/shiftd
(Debian, Ubuntu) or
.I /etc/sysconfig/shiftd
(RHEL, Amazon Linux) when it exists (systemd's
.BR EnvironmentFile= ).
The packages install both commented.
.TP
.B SHIFTD_LOG
Log filter, as RUST_LOG (e.g.
.BR debug ).
.TP
.BR HTTPS_PROXY ", " HTTP_PROXY ", " NO_PROXY
A proxy for the calls to AWS.
.B NO_PROXY
must include
.B 169.254.169.254
so that the instance metadata service (IMDS) is reached directly.
.TP
.BR AWS_USE_FIPS_ENDPOINT ", " AWS_USE_DUALSTACK_ENDPOINT
.B true
selects the FIPS or the dual-stack (IPv6) endpoints of STS and EC2.
.TP
.BR AWS_CONFIG_FILE ", " AWS_SHARED_CREDENTIALS_FILE
The AWS config files that
\fB[credentials] source = "profile"\fR
reads. The unit hides home directories
.RB ( ProtectHome=yes ):
put them under
.IR /etc/shiftd/ ,
readable by the group
.BR shiftd .
.PP
The other standard AWS SDK variables work too, e.g.
.BR AWS_ENDPOINT_URL ", " AWS_ENDPOINT_URL_STS ", " AWS_ENDPOINT_URL_EC2 " and " AWS_EC2_METADATA_SERVICE_ENDPOINT
(the tests point shiftd at local fakes with them).
.SH EXIT STATUS
.TP
.B 0
Success.
.TP
.B 1
Another error; the unit restarts shiftd after 10 seconds.
.B shiftd doctor
exits 1 when a check fails.
.TP
.B 2
A usage error: an unknown command or option, or an invalid option value (for example
.B plan \-\-until
not after
.BR \-\-from ,
or an unknown
.BR "policy \-\-account" ).
.TP
.B 78
The configuration is invalid, missing, or writable by group or others (sysexits EX_CONFIG); the unit
does not restart shiftd.
.SH FILES
.TP
.I /etc/shiftd/shiftd.toml
The configuration; see
.BR shiftd.toml (5).
.TP
.IR /etc/default/shiftd ", " /etc/sysconfig/shiftd
The service's environment (see ENVIRONMENT).
.TP
.IR /var/lib/shiftd/state.json ", " /var/lib/shiftd/state.N.log
What
.B run
keeps across restarts.
.TP
.I /usr/share/doc/shiftd/examples/shiftd.toml
The annotated example as shipped.
.SH EXAMPLES
.nf
journalctl \-u shiftd SHIFTD_ACTION=stop SHIFTD_RESULT=failed
systemctl reload shiftd
shiftd plan \-\-hours 24
shiftd policy \-\-delegate\-account 123456789012
.fi
"#;

pub fn main(cli: Command, args: &[OsString]) -> ExitCode {
    let matches = Command::new(COMMAND)
        .bin_name(format!("shiftd {COMMAND}"))
        .about("Write the man pages and shell completions made from the command line's definition")
        .arg(
            Arg::new("out")
                .long("out")
                .required(true)
                .value_parser(clap::value_parser!(PathBuf))
                .help("Directory to write them to (created if missing)"),
        )
        .arg(
            Arg::new("date")
                .long("date")
                .value_parser(|s: &str| {
                    chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d")
                        .map(|_| s.to_string())
                        .map_err(|e| format!("expected YYYY-MM-DD: {e}"))
                })
                .help("The pages' date, YYYY-MM-DD (default: none)"),
        )
        .get_matches_from(std::iter::once(OsString::from(COMMAND)).chain(args.iter().cloned()));
    let out = matches.get_one::<PathBuf>("out").expect("required");
    let date = matches.get_one::<String>("date").map_or("", String::as_str);
    match write_all(cli, out, date) {
        Ok(files) => {
            for f in files {
                println!("{}", f.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{}: {e}", out.display());
            ExitCode::FAILURE
        }
    }
}

fn write_all(mut cli: Command, out: &Path, date: &str) -> io::Result<Vec<PathBuf>> {
    cli.build();
    let completions = out.join("completions");
    std::fs::create_dir_all(&completions)?;
    let mut files = Vec::new();
    let mut write = |path: PathBuf, bytes: &[u8]| -> io::Result<()> {
        std::fs::write(&path, bytes)?;
        files.push(path);
        Ok(())
    };
    write(out.join("shiftd.8"), main_page(&cli, date)?.as_bytes())?;
    for sub in commands(&cli) {
        let page = command_page(sub, date)?;
        write(
            out.join(format!("shiftd-{}.{SECTION}", sub.get_name())),
            page.as_bytes(),
        )?;
    }
    for (shell, name) in [
        (Shell::Bash, "shiftd.bash"),
        (Shell::Zsh, "_shiftd"),
        (Shell::Fish, "shiftd.fish"),
    ] {
        let mut script = Vec::new();
        clap_complete::generate(shell, &mut cli.clone(), "shiftd", &mut script);
        write(completions.join(name), &script)?;
    }
    Ok(files)
}

/// The commands a user may type (not clap's `help`).
fn commands(cli: &Command) -> impl Iterator<Item = &Command> {
    cli.get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
}

fn man(cmd: Command, date: &str) -> Man {
    let title = cmd
        .get_display_name()
        .unwrap_or_else(|| cmd.get_name())
        .to_uppercase();
    Man::new(cmd)
        .title(title)
        .section(SECTION)
        .date(date)
        .source(format!("shiftd {}", env!("CARGO_PKG_VERSION")))
        .manual("System Administration")
}

type Render = fn(&Man, &mut dyn io::Write) -> io::Result<()>;

/// One section as clap_mangen renders it, without the preamble that each rendering repeats and,
/// with `heading: false`, without its `.SH` line (to set it under a heading of this page's own).
fn section(man: &Man, render: Render, heading: bool) -> io::Result<String> {
    let mut buf = Vec::new();
    render(man, &mut buf)?;
    let text = String::from_utf8(buf).map_err(io::Error::other)?;
    Ok(text
        .lines()
        .filter(|l| !l.starts_with(".ie \\n(.g") && !l.starts_with(".el .ds Aq"))
        .filter(|l| heading || !l.starts_with(".SH "))
        .map(|l| format!("{l}\n"))
        .collect())
}

/// shiftd(8): the synopsis of every command, the description, every command with its options, and
/// the environment, exit status, files and examples.
fn main_page(cli: &Command, date: &str) -> io::Result<String> {
    let root = man(cli.clone(), date);
    let mut page = String::new();
    let mut title = Vec::new();
    root.render_title(&mut title)?;
    page.push_str(&String::from_utf8(title).map_err(io::Error::other)?);
    page.push_str(&section(&root, Man::render_name_section, true)?);
    page.push_str(".SH SYNOPSIS\n");
    for (i, sub) in commands(cli).enumerate() {
        if i > 0 {
            page.push_str(".br\n");
        }
        page.push_str(&section(
            &man(sub.clone(), date),
            Man::render_synopsis_section,
            false,
        )?);
    }
    page.push_str(".br\n.B shiftd \\-\\-version\n.br\n.B shiftd \\-\\-help\n");
    page.push_str(&section(&root, Man::render_description_section, true)?);
    page.push_str(".SH COMMANDS\n");
    for sub in commands(cli) {
        let m = man(sub.clone(), date);
        page.push_str(&format!(".SS \"shiftd {}\"\n", sub.get_name()));
        page.push_str(&section(&m, Man::render_description_section, false)?);
        page.push_str(&section(&m, Man::render_options_section, false)?);
    }
    page.push_str(&section(&root, Man::render_options_section, true)?);
    page.push_str(EXTRA_SECTIONS);
    page.push_str(&see_also(
        commands(cli).map(|s| format!("shiftd\\-{} ({SECTION})", s.get_name())),
    ));
    Ok(page)
}

/// shiftd-COMMAND(8): one command's synopsis, description and options, as clap_mangen renders them.
fn command_page(sub: &Command, date: &str) -> io::Result<String> {
    let mut buf = Vec::new();
    let m = man(sub.clone(), date);
    m.render_title(&mut buf)?;
    for render in [
        Man::render_name_section as Render,
        Man::render_synopsis_section,
        Man::render_description_section,
        Man::render_options_section,
    ] {
        buf.extend(section(&m, render, true)?.into_bytes());
    }
    let mut page = String::from_utf8(buf).map_err(io::Error::other)?;
    page.push_str(
        ".SH EXIT STATUS\n0 on success, 1 on an error, 2 on a usage error, 78 when the configuration \
         is invalid; see\n.BR shiftd (8).\n",
    );
    page.push_str(&see_also([format!("shiftd ({SECTION})")]));
    Ok(page)
}

/// The SEE ALSO section: `pages` first, then the configuration's page and systemd's tools.
fn see_also(pages: impl IntoIterator<Item = String>) -> String {
    let refs: Vec<String> = pages
        .into_iter()
        .chain([
            "shiftd.toml (5)".into(),
            "systemctl (1)".into(),
            "journalctl (1)".into(),
        ])
        .map(|r| format!(".BR {r}"))
        .collect();
    format!(".SH SEE ALSO\n{}\n", refs.join(",\n"))
}
