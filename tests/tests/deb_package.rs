//! The .deb's metadata (`[package.metadata.deb]` in gateway/Cargo.toml, read by cargo-deb)
//! describes a package that can be built from this tree: every asset it names exists, the
//! conffile `/etc/outpost/outpost.toml` is `examples/outpost.toml` and passes `outpost check`
//! the way the unit runs it, the unit is enabled but not started.
//!
//! Building the package needs cargo-deb, which CI does not install, so this test reads the
//! metadata rather than building. Where a package was built (`cargo deb -p outpost --profile
//! dist` leaves it in `target/debian/`) and `dpkg-deb` is present, the package itself is also
//! opened and its files compared with the tree; a package older than the files it holds is
//! reported as stale and not compared.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::SystemTime;

use outpost_e2e::gateway::outpost_command;
use outpost_e2e::process::run_to_completion;
use outpost_e2e::workspace_root;
use toml::{Table, Value};

const CONFFILE: &str = "/etc/outpost/outpost.toml";
/// cargo-deb's spelling of "the binary cargo built": it puts the profile the package is built
/// with (`--profile dist`) in place of `release`.
const BUILT_BINARY_PREFIX: &str = "target/release/";

fn gateway_dir() -> PathBuf {
    workspace_root().join("gateway")
}

fn manifest() -> Table {
    let path = gateway_dir().join("Cargo.toml");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    toml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn deb_metadata(manifest: &Table) -> &Table {
    manifest
        .get("package")
        .and_then(|p| p.get("metadata"))
        .and_then(|m| m.get("deb"))
        .and_then(Value::as_table)
        .expect("gateway/Cargo.toml has [package.metadata.deb]")
}

/// One `[source, destination, mode]` row of `assets`.
#[derive(Debug)]
struct Asset {
    source: String,
    dest: String,
    mode: String,
}

impl Asset {
    /// Where the file lands, absolute: a destination ending in `/` is a directory.
    fn installed_path(&self) -> String {
        let name = Path::new(&self.source).file_name().and_then(|n| n.to_str()).unwrap_or_default();
        let dest = if self.dest.ends_with('/') { format!("{}{name}", self.dest) } else { self.dest.clone() };
        format!("/{}", dest.trim_start_matches('/'))
    }
}

fn assets(deb: &Table) -> Vec<Asset> {
    let rows = deb.get("assets").and_then(Value::as_array).expect("`assets` is a list");
    rows.iter()
        .map(|row| {
            let fields: Vec<&str> =
                row.as_array().expect("an asset is a list").iter().filter_map(Value::as_str).collect();
            let [source, dest, mode] = fields[..] else {
                panic!("an asset is [source, destination, mode]: {row}")
            };
            Asset { source: source.to_owned(), dest: dest.to_owned(), mode: mode.to_owned() }
        })
        .collect()
}

fn bin_names(manifest: &Table) -> Vec<String> {
    manifest
        .get("bin")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|bin| bin.get("name").and_then(Value::as_str).map(str::to_owned))
        .collect()
}

#[test]
fn every_asset_exists_and_the_conffile_is_the_example_config() {
    let manifest = manifest();
    let deb = deb_metadata(&manifest);
    let assets = assets(deb);
    let bins = bin_names(&manifest);
    let mut binaries = 0;
    for asset in &assets {
        if let Some(name) = asset.source.strip_prefix(BUILT_BINARY_PREFIX) {
            binaries += 1;
            assert!(
                bins.contains(&name.to_owned()),
                "asset {asset:?} is no [[bin]] of the package: {bins:?}"
            );
            assert_eq!(asset.installed_path(), format!("/usr/bin/{name}"), "{asset:?}");
            assert_eq!(asset.mode, "755", "{asset:?}");
        } else {
            let source = gateway_dir().join(&asset.source);
            assert!(source.is_file(), "asset {asset:?}: {} does not exist", source.display());
            assert_eq!(asset.mode, "644", "a data file is not executable: {asset:?}");
        }
    }
    assert_eq!(binaries, 1, "the package ships the outpost binary once");

    let conf_files: Vec<&str> = deb
        .get("conf-files")
        .and_then(Value::as_array)
        .expect("`conf-files` is a list")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(conf_files, [CONFFILE]);
    let conffile_asset = assets
        .iter()
        .find(|a| a.installed_path() == CONFFILE)
        .unwrap_or_else(|| panic!("no asset installs {CONFFILE}: {assets:?}"));
    let source = gateway_dir().join(&conffile_asset.source).canonicalize().expect("the conffile's source");
    let example =
        workspace_root().join("examples/outpost.toml").canonicalize().expect("examples/outpost.toml");
    assert_eq!(source, example, "{CONFFILE} is the example config");

    // The unit: `<unit-scripts>/<package>.service`, enabled at install, started by the operator
    // once the config is edited.
    let units =
        deb.get("systemd-units").and_then(Value::as_table).expect("[package.metadata.deb] systemd-units");
    let dir = units.get("unit-scripts").and_then(Value::as_str).expect("systemd-units.unit-scripts");
    let package = manifest.get("package").and_then(|p| p.get("name")).and_then(Value::as_str).expect("name");
    let unit = gateway_dir().join(dir).join(format!("{package}.service"));
    assert!(unit.is_file(), "{} does not exist", unit.display());
    // Without `maintainer-scripts` cargo-deb installs the unit but writes no postinst: the unit
    // would never be enabled, nor stopped on removal.
    let scripts = deb
        .get("maintainer-scripts")
        .and_then(Value::as_str)
        .expect("`maintainer-scripts` is set: cargo-deb generates the systemd maintainer scripts only then");
    assert!(gateway_dir().join(scripts).is_dir(), "maintainer-scripts = {scripts:?} is no directory");
    assert_eq!(units.get("enable").and_then(Value::as_bool), Some(true), "the unit is enabled at install");
    assert_eq!(
        units.get("start").and_then(Value::as_bool),
        Some(false),
        "not started before the config is edited"
    );
}

/// The environment the unit sets for the gateway (`Environment=NAME=VALUE` lines).
fn unit_environment() -> Vec<(String, String)> {
    let unit =
        std::fs::read_to_string(workspace_root().join("systemd/outpost.service")).expect("read the unit");
    unit.lines()
        .filter_map(|line| line.strip_prefix("Environment="))
        .flat_map(|vars| vars.split_whitespace())
        .filter_map(|var| var.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())))
        .collect()
}

#[test]
fn the_conffile_passes_check_as_the_unit_runs_it() {
    let environment = unit_environment();
    assert!(
        environment.iter().any(|(name, _)| name == "OUTPOST_DATA_DIR"),
        "the unit puts the buffer in its StateDirectory: {environment:?}"
    );
    // The unit's state directory, here a temporary one.
    let state = tempfile::tempdir().expect("tempdir");
    let mut command = outpost_command().expect("the outpost binary");
    for (name, value) in environment {
        let value = if name == "OUTPOST_DATA_DIR" { state.path().display().to_string() } else { value };
        command.env(name, value);
    }
    command.arg("check").arg("--config").arg(workspace_root().join("examples/outpost.toml"));
    let output = run_to_completion(command).expect("run outpost check");
    assert!(
        output.status.success(),
        "outpost check on the conffile: {}\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(std::fs::read_dir(state.path()).expect("list").count(), 0, "check creates nothing");
}

/// The target directory this test was built in (`target/<profile>/deps/<test>`).
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable");
    exe.ancestors().nth(3).expect("target/<profile>/deps/<test>").to_path_buf()
}

fn modified(path: &Path) -> SystemTime {
    std::fs::metadata(path).and_then(|m| m.modified()).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The newest `outpost_*.deb` cargo-deb left in `target/debian/`, if any.
fn built_package() -> Option<PathBuf> {
    let dir = target_dir().join("debian");
    let entries = std::fs::read_dir(&dir).ok()?;
    entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            name.starts_with("outpost_") && name.ends_with(".deb")
        })
        .max_by_key(|p| modified(p))
}

fn dpkg_deb(args: &[&str], package: &Path) -> String {
    let output = Command::new("dpkg-deb").args(args).arg(package).output().expect("run dpkg-deb");
    assert!(output.status.success(), "dpkg-deb {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn a_built_package_holds_what_the_metadata_says() {
    let Some(package) = built_package() else {
        eprintln!(
            "notice: no target/debian/outpost_*.deb (build one with `cargo deb -p outpost --profile dist`)"
        );
        return;
    };
    if Command::new("dpkg-deb").arg("--version").output().is_err() {
        eprintln!("notice: dpkg-deb is missing; {} not opened", package.display());
        return;
    }
    let manifest = manifest();
    let assets = assets(deb_metadata(&manifest));
    let sources: Vec<PathBuf> = assets
        .iter()
        .filter(|a| !a.source.starts_with(BUILT_BINARY_PREFIX))
        .map(|a| gateway_dir().join(&a.source))
        .chain([workspace_root().join("systemd/outpost.service")])
        .collect();
    let built = modified(&package);
    if let Some(newer) = sources.iter().find(|source| modified(source) > built) {
        eprintln!(
            "notice: {} is stale ({} changed since); rebuild it with `cargo deb -p outpost --profile dist` to compare",
            package.display(),
            newer.display()
        );
        return;
    }

    let contents = dpkg_deb(&["--contents"], &package);
    let unpacked = tempfile::tempdir().expect("tempdir");
    let output =
        Command::new("dpkg-deb").arg("-x").arg(&package).arg(unpacked.path()).output().expect("dpkg-deb -x");
    assert!(output.status.success(), "dpkg-deb -x: {}", String::from_utf8_lossy(&output.stderr));
    for asset in &assets {
        let installed = unpacked.path().join(asset.installed_path().trim_start_matches('/'));
        assert!(installed.is_file(), "{} is not in the package:\n{contents}", asset.installed_path());
        if !asset.source.starts_with(BUILT_BINARY_PREFIX) {
            let expected = std::fs::read(gateway_dir().join(&asset.source)).expect("read the asset");
            assert!(
                std::fs::read(&installed).expect("read") == expected,
                "{} differs from {}",
                asset.installed_path(),
                asset.source
            );
        }
    }
    let unit = ["lib/systemd/system/outpost.service", "usr/lib/systemd/system/outpost.service"]
        .iter()
        .map(|p| unpacked.path().join(p))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("no outpost.service in the package:\n{contents}"));
    assert_eq!(
        std::fs::read_to_string(unit).expect("read the packaged unit"),
        std::fs::read_to_string(workspace_root().join("systemd/outpost.service")).expect("read the unit"),
        "the packaged unit is systemd/outpost.service"
    );

    let control = tempfile::tempdir().expect("tempdir");
    let output =
        Command::new("dpkg-deb").arg("-e").arg(&package).arg(control.path()).output().expect("dpkg-deb -e");
    assert!(output.status.success(), "dpkg-deb -e: {}", String::from_utf8_lossy(&output.stderr));
    let conffiles = std::fs::read_to_string(control.path().join("conffiles")).expect("a conffiles list");
    assert_eq!(conffiles.lines().collect::<Vec<_>>(), [CONFFILE], "conffiles");
    let postinst = std::fs::read_to_string(control.path().join("postinst")).expect("a postinst script");
    assert!(postinst.contains("deb-systemd-helper enable"), "the unit is enabled at install:\n{postinst}");
    assert!(
        !postinst.contains("deb-systemd-invoke start"),
        "the unit is not started at install:\n{postinst}"
    );
    let prerm = std::fs::read_to_string(control.path().join("prerm")).expect("a prerm script");
    assert!(prerm.contains("deb-systemd-invoke stop"), "removal stops the gateway:\n{prerm}");
    println!(
        "{}: {} bytes, {}",
        package.display(),
        std::fs::metadata(&package).map(|m| m.len()).unwrap_or(0),
        dpkg_deb(&["--field"], &package).lines().filter(|l| l.starts_with("Depends")).collect::<String>()
    );
}
