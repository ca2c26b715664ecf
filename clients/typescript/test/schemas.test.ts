/** Ajv (2020-12, strict mode) compiles every contract schema once the mesh's x-* keywords are
 * declared from the vocabulary meta-schema, and each schema's examples pass under it. */
import assert from "node:assert/strict";
import { readdirSync, readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { join } from "node:path";
import { test } from "node:test";
import { fileURLToPath } from "node:url";

const require = createRequire(import.meta.url);
// ajv is CommonJS: its default export is the class
const Ajv2020 = (require("ajv/dist/2020") as { default: new (o: object) => AjvLike }).default;
interface AjvLike {
  addVocabulary(keywords: string[]): void;
  addKeyword(def: { keyword: string; schemaType?: string[] }): void;
  compile(schema: object): ((data: unknown) => boolean) & { errors?: unknown };
}

const here = fileURLToPath(new URL(".", import.meta.url)); // clients/typescript/dist/test/
const schemas = process.env.MESH_SCHEMAS_DIR ?? join(here, "..", "..", "..", "..", "contracts", "schemas");
const meta = JSON.parse(readFileSync(join(schemas, "mesh-vocabulary.json"), "utf8")) as { properties: Record<string, unknown> };
const files = readdirSync(join(schemas, "v1")).filter((f) => f.endsWith(".json")).sort();

test("the vocabulary declares the x-* keywords the schemas use", () => {
  const used = new Set<string>();
  const walk = (node: unknown): void => {
    if (Array.isArray(node)) node.forEach(walk);
    else if (node !== null && typeof node === "object") {
      for (const [k, v] of Object.entries(node)) {
        if (k.startsWith("x-")) used.add(k);
        if (k !== "examples" && k !== "default" && k !== "const") walk(v);
      }
    }
  };
  for (const f of files) walk(JSON.parse(readFileSync(join(schemas, "v1", f), "utf8")));
  assert.ok(used.size > 0);
  assert.deepEqual([...used].filter((k) => !(k in meta.properties)), []);
});

test("Ajv2020 in strict mode compiles every contract schema, and each example is valid", () => {
  const ajv = new Ajv2020({ strict: true, allErrors: true });
  ajv.addVocabulary(Object.keys(meta.properties)); // the x-* keywords, and OpenAPI's discriminator pydantic writes
  assert.ok(files.length >= 50, `only ${files.length} schemas under ${schemas}`);
  for (const f of files) {
    const schema = JSON.parse(readFileSync(join(schemas, "v1", f), "utf8")) as { examples?: unknown[] };
    const validate = ajv.compile(schema);
    for (const example of schema.examples ?? []) {
      assert.ok(validate(example), `${f}: example invalid: ${JSON.stringify(validate.errors)}`);
    }
  }
});

test("strict mode refuses a keyword nobody declared (the vocabulary is what makes it pass)", () => {
  const ajv = new Ajv2020({ strict: true });
  const schema = JSON.parse(readFileSync(join(schemas, "v1", "task.submitted.json"), "utf8")) as object;
  assert.throws(() => ajv.compile(schema), /unknown keyword: "x-/);
});
