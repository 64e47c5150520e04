# A stand-in for the few nixpkgs `lib` functions the module uses, for
# machines without nixpkgs (CI here). It evaluates the module's logic:
# option defaults, environment, assertions and unit settings. It does not
# check option types or merge definitions the way the real module system
# does; eval.nix does that against real nixpkgs.
let
  inherit (builtins)
    all
    attrNames
    concatStringsSep
    filter
    genList
    listToAttrs
    stringLength
    substring
    ;
  hasPrefix = p: s: substring 0 (stringLength p) s == p;
  type = name: { inherit name; };
in
rec {
  inherit all concatStringsSep;
  inherit hasPrefix;
  removePrefix =
    p: s: if hasPrefix p s then substring (stringLength p) (stringLength s - stringLength p) s else s;
  hasInfix =
    infix: s:
    let
      n = stringLength infix;
    in
    n <= stringLength s
    && builtins.any (i: substring i n s == infix) (genList (i: i) (stringLength s - n + 1));
  filterAttrs =
    pred: set:
    listToAttrs (
      map (name: {
        inherit name;
        value = set.${name};
      }) (filter (name: pred name set.${name}) (attrNames set))
    );
  mapAttrsToList = f: set: map (name: f name set.${name}) (attrNames set);
  optional = cond: x: if cond then [ x ] else [ ];
  escapeShellArg = s: "'${builtins.replaceStrings [ "'" ] [ "'\\''" ] (toString s)}'";
  escapeShellArgs = args: concatStringsSep " " (map escapeShellArg args);
  literalExpression = text: {
    _type = "literalExpression";
    inherit text;
  };

  mkOption = attrs: { _type = "option"; } // attrs;
  mkEnableOption =
    name:
    mkOption {
      default = false;
      description = "Whether to enable ${name}.";
    };
  mkIf = condition: content: {
    _type = "if";
    inherit condition content;
  };

  types = {
    str = type "str";
    bool = type "bool";
    port = type "port";
    package = type "package";
    nullOr = t: type "nullOr ${t.name}";
    attrsOf = t: type "attrsOf ${t.name}";
    enum = values: type "enum" // { inherit values; };
    ints = {
      positive = type "positive";
      unsigned = type "unsigned";
      between = lo: hi: type "between" // { inherit lo hi; };
    };
  };

  # Pushes `mkIf`s down as the module system does for plain attribute
  # sets: a false condition removes the attribute.
  resolveIfs =
    v:
    if builtins.isAttrs v && (v._type or null) == "if" then
      (if v.condition then resolveIfs v.content else null)
    else if builtins.isAttrs v && !(v ? outPath) then
      filterAttrs (_: x: x != null) (builtins.mapAttrs (_: resolveIfs) v)
    else
      v;
}
