# Resolves requested package names to derivations.
#
# Uses builtins only, so it works with any package set, not just nixpkgs.
# Every input arrives as a string (--argstr): package names are data and
# never become Nix code.
#
# Output (with --eval --strict --json): a JSON string whose content is
#   { "found": { "<name>": { "drvPath": ..., "outPath": ..., "mainProgram": ...,
#                            "licenses": [ spdxId ], "homepage": ... } },
#     "notFound": [ "<name>" ],
#     "source": { "path": ..., "rev": ..., "narHash": ... } }
# where `source` says what was evaluated (null where unknown).
{
  # "path", "nixpkgs", "git" or "flake" (needs the flakes feature).
  srcType ? "path"
, # path: absolute path of the package set.
  # nixpkgs: channel name or commit, or a tarball URL or absolute path.
  # git: JSON arguments of builtins.fetchGit (url, rev, ref or allRefs).
  # flake: a flake reference; packages.<system>, then legacyPackages.
  srcArgs
, system ? builtins.currentSystem
, # JSON list of package names.
  packages ? "[]"
}:

let
  inherit (builtins)
    attrNames concatStringsSep filter fromJSON hasAttr head isAttrs
    isList isString listToAttrs match partition replaceStrings split
    substring tail toJSON unsafeDiscardStringContext;

  isUrl = s: match "[a-zA-Z][a-zA-Z0-9+.-]*://.*" s != null;
  isAbsolute = s: substring 0 1 s == "/";

  pkgSrc =
    if srcType == "path" then
      (if isAbsolute srcArgs then /. + srcArgs
      else throw "srcType path needs an absolute path, got: ${srcArgs}")
    else if srcType == "nixpkgs" then
      builtins.fetchTarball
        (if isUrl srcArgs then srcArgs
        else if isAbsolute srcArgs then "file://${srcArgs}"
        else "https://github.com/NixOS/nixpkgs/archive/${srcArgs}.tar.gz")
    else if srcType == "git" then
      builtins.fetchGit (fromJSON srcArgs)
    else if srcType == "flake" then
      builtins.getFlake srcArgs
    else
      throw "unknown package source type: ${srcType}";

  # A flake's own packages win over its legacyPackages (only names are
  # read to merge them; no package is evaluated).
  pkgs =
    if srcType == "flake" then
      (pkgSrc.legacyPackages.${system} or { }) // (pkgSrc.packages.${system} or { })
    else import pkgSrc { inherit system; };

  # What was evaluated, for the build record: fetchGit and flakes report a
  # commit and NAR hash; a tarball only its store path.
  info = if srcType == "flake" then pkgSrc.sourceInfo else pkgSrc;
  sourceInfo = {
    path = if srcType == "path" then null else unsafeDiscardStringContext (toString info);
    rev = if isAttrs info then info.rev or null else null;
    narHash = if isAttrs info then info.narHash or null else null;
  };

  upper = [ "A" "B" "C" "D" "E" "F" "G" "H" "I" "J" "K" "L" "M" "N" "O" "P" "Q" "R" "S" "T" "U" "V" "W" "X" "Y" "Z" ];
  lower = [ "a" "b" "c" "d" "e" "f" "g" "h" "i" "j" "k" "l" "m" "n" "o" "p" "q" "r" "s" "t" "u" "v" "w" "x" "y" "z" ];
  toLower = replaceStrings upper lower;

  # Registry image names are lowercase, but package sets use camelCase
  # (bashInteractive): map lowercased top-level names to real ones.
  # Only names are read, so no package is evaluated. Built lazily, on the
  # first miss.
  lowerNames = listToAttrs (map (n: { name = toLower n; value = n; }) (attrNames pkgs));

  # Walks `comps` from `set`; null when a step is missing.
  walk = set: comps:
    if comps == [ ] then { value = set; }
    else if isAttrs set && hasAttr (head comps) set
    then walk set.${head comps} (tail comps)
    else null;

  isDerivation = v: isAttrs v && (v.type or null) == "derivation";

  # The first of the top-level names `firsts` under which `rest` leads to
  # a derivation, or null.
  firstHit = firsts: rest:
    let
      hits = filter (r: r != null && isDerivation r.value)
        (map (c: walk pkgs ([ c ] ++ rest)) firsts);
    in
    if hits == [ ] then null else (head hits).value;

  # Tries the first component as given, then `_`-prefixed when it starts
  # with a digit (1password -> _1password), and only then, as the
  # original does, case-insensitively (bashinteractive -> bashInteractive).
  lookup = name:
    let
      comps = filter isString (split "\\." name);
      first = head comps;
      exact = [ first ] ++ (if match "[0-9].*" first != null then [ "_${first}" ] else [ ]);
      folded = map (c: lowerNames.${toLower c}) (filter (c: hasAttr (toLower c) lowerNames) exact);
      hit = firstHit exact (tail comps);
    in
    if name == "" then null
    else if hit != null then hit
    else firstHit folded (tail comps);

  requested = fromJSON packages;
  names =
    if isList requested && (filter (n: !isString n) requested) == [ ]
    # Deduplicated (and sorted): each name is one key of the output.
    then attrNames (listToAttrs (map (n: { name = n; value = null; }) requested))
    else throw "packages must be a JSON list of strings";

  results = map (name: { inherit name; drv = lookup name; }) names;
  parts = partition (r: r.drv != null) results;
  # toJSON prints any attrset with an `outPath` as that string, so the
  # objects are assembled by hand; toJSON still escapes every string.
  # meta.mainProgram, when declared as a plain name, is the image's
  # default command (see the README's "Default command").
  mainProgram = drv:
    let m = (drv.meta or { }).mainProgram or null;
    in if isString m && match "[^/]+" m != null then m else null;
  # meta.license's SPDX identifiers and meta.homepage, for the bill of
  # materials; only what is declared, never a guess.
  licenses = drv:
    let
      l = (drv.meta or { }).license or [ ];
      ls = if isList l then l else [ l ];
    in map (x: x.spdxId) (filter (x: isAttrs x && isString (x.spdxId or null)) ls);
  homepage = drv:
    let
      h = (drv.meta or { }).homepage or null;
      first = if isList h && h != [ ] then head h else h;
    in if isString first then first else null;
  entry = r: "${toJSON r.name}:{\"drvPath\":${toJSON (unsafeDiscardStringContext r.drv.drvPath)},\"outPath\":${toJSON (unsafeDiscardStringContext r.drv.outPath)},\"mainProgram\":${toJSON (mainProgram r.drv)},\"licenses\":${toJSON (licenses r.drv)},\"homepage\":${toJSON (homepage r.drv)}}";
in
"{\"found\":{${concatStringsSep "," (map entry parts.right)}},\"notFound\":${toJSON (map (r: r.name) parts.wrong)},\"source\":${toJSON sourceInfo}}"
